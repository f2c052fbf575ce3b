"""Classifier-free guidance around a `D(x, sigma)` denoiser, with per-image prompts and prompt schedules.

Every denoiser call evaluates, for each image, its conditional parts (several for `AND` prompts) and its
unconditional (negative) prompt. Rows whose contexts have the same token length run as one batch, as A1111
does when cond and uncond chunk counts agree; otherwise they run in separate batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sdserver.pipeline.conditioning import PromptConditioning, TextConditioning

DenoiseRows = Callable[..., torch.Tensor]
VectorCond = Callable[[torch.Tensor | None], torch.Tensor | None]
NoiseLevel = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    conds: tuple[PromptConditioning, ...]  # one per image of the batch
    unconds: tuple[PromptConditioning, ...]
    cfg_scale: float
    s_min_uncond: float = 0.0
    image_cond: torch.Tensor | None = None  # [B, C, h, w] extra UNet input channels (inpainting models)


class CFGDenoiser:
    """Counts its calls: A1111's prompt schedules refer to denoiser calls, not sampler steps.

    `skip_level(sigma)` is what `s_min_uncond` is compared with (see `sampling.run.uncond_skip_level`): sigma
    itself by default, the DDPM timestep for the timestep samplers, as in A1111.
    """

    def __init__(self, denoiser: DenoiseRows, guidance: Guidance, vector_cond: VectorCond | None = None,
                 skip_level: NoiseLevel | None = None) -> None:
        self.denoiser = denoiser
        self.guidance = guidance
        self.vector_cond = vector_cond
        self.skip_level = skip_level
        self.step = 0

    @property
    def prediction(self) -> str:
        """The wrapped UNet's prediction type ("eps" or "v"); UniPC needs it to convert like A1111."""
        return str(getattr(self.denoiser, "prediction", "eps"))

    def skips_uncond(self, sigma: torch.Tensor) -> bool:
        """A1111 drops the negative prompt on every other call while the first image's level is below
        s_min_uncond."""
        threshold = self.guidance.s_min_uncond
        if threshold <= 0 or self.step % 2 == 0:
            return False
        level = sigma if self.skip_level is None else self.skip_level(sigma)
        return float(level.reshape(-1)[0]) < threshold

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        return self.denoise_with_uncond(x, sigma, cond_scale_multiplier=1.0)[0]

    def denoise_with_uncond(
        self, x: torch.Tensor, sigma: torch.Tensor, *, cond_scale_multiplier: float = 1.0, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.guidance
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        skip_uncond = self.skips_uncond(sigma)
        rows: list[tuple[int, TextConditioning]] = []  # (image index, conditioning)
        weights: list[list[tuple[int, float]]] = []  # per image: (row index, weight) of its cond parts
        uncond_rows: list[int] = []
        for i in range(x.shape[0]):
            parts = []
            for part in g.conds[i].parts:
                parts.append((len(rows), part.weight))
                rows.append((i, part.at(self.step)))
            weights.append(parts)
            uncond_rows.append(len(rows))
            rows.append((i, g.unconds[i].parts[0].at(self.step)))
        if skip_uncond:
            keep = [r for r in range(len(rows)) if r not in set(uncond_rows)]
        else:
            keep = list(range(len(rows)))
        out = self._run_rows(x, sigma, rows, keep)
        self.step += 1
        scale = g.cfg_scale * cond_scale_multiplier
        guided, unconds = [], []
        for i in range(x.shape[0]):
            if skip_uncond:
                # A1111 skips the negative branch at low noise on every other step; the image's own
                # conditional prediction then stands in for the guided one.
                cond = sum(out[r] * w for r, w in weights[i]) / sum(w for _, w in weights[i])
                guided.append(cond)
                unconds.append(cond)
                continue
            uncond = out[uncond_rows[i]]
            guided.append(uncond + sum((out[r] - uncond) * (w * scale) for r, w in weights[i]))
            unconds.append(uncond)
        return torch.stack(guided), torch.stack(unconds)

    def _run_rows(
        self, x: torch.Tensor, sigma: torch.Tensor, rows: list[tuple[int, TextConditioning]], keep: list[int]
    ) -> dict[int, torch.Tensor]:
        groups: dict[int, list[int]] = {}
        for r in keep:
            groups.setdefault(rows[r][1].context.shape[0], []).append(r)
        out: dict[int, torch.Tensor] = {}
        for members in groups.values():
            images = [rows[r][0] for r in members]
            extra: dict[str, Any] = {"context": torch.stack([rows[r][1].context for r in members])}
            if self.vector_cond is not None:
                pooled = [rows[r][1].pooled for r in members]
                extra["y"] = self.vector_cond(None if pooled[0] is None else torch.stack(pooled))  # type: ignore[arg-type]
            if self.guidance.image_cond is not None:
                extra["concat"] = self.guidance.image_cond[images]
            result = self.denoiser(x[images], sigma[images], **extra)
            for row, value in zip(members, result):
                out[row] = value
        return out


def _vp_scale(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return ((sigma**2 + 1) ** 0.5).reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


class OutputMaskedDenoiser:
    """Inpainting for the k-diffusion samplers (A1111's blend "after"): the denoised value keeps the input's
    latent where `keep` is 1; the denoiser sees the sampler's latent unchanged."""

    def __init__(self, inner: Any, init: torch.Tensor, keep: torch.Tensor, regen: torch.Tensor) -> None:
        self.inner, self.init, self.keep, self.regen = inner, init, keep, regen

    @property
    def prediction(self) -> str:
        return str(getattr(self.inner, "prediction", "eps"))

    def _blend(self, denoised: torch.Tensor) -> torch.Tensor:
        return denoised * self.regen + self.init * self.keep

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        return self._blend(self.inner(x, sigma, **extra))

    def denoise_with_uncond(self, x: torch.Tensor, sigma: torch.Tensor, *, cond_scale_multiplier: float = 1.0,
                            **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        guided, uncond = self.inner.denoise_with_uncond(x, sigma, cond_scale_multiplier=cond_scale_multiplier, **extra)
        return self._blend(guided), uncond


class InputMaskedDenoiser:
    """Inpainting for the timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC), as A1111 1.10 does it (its CFG
    denoiser's `mask_before_denoising`): before the UNet runs, the sampler's VP latent x_t takes the input's
    *un-noised* latent where `keep` is 1; nothing is blended afterwards, and the sampler goes on from its own
    unblended x_t with the eps of the blended one.

    The timestep samplers call this with the VE latent x = x_t * sqrt(1 + sigma^2); the eps they read back is
    (x - D) / sigma, so the blended call's D is shifted by x - x_blended to hand them the blended latent's eps.
    """

    def __init__(self, inner: Any, init: torch.Tensor, keep: torch.Tensor, regen: torch.Tensor) -> None:
        self.inner, self.init, self.keep, self.regen = inner, init, keep, regen

    @property
    def prediction(self) -> str:
        return str(getattr(self.inner, "prediction", "eps"))

    def _blend(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        scale = _vp_scale(sigma, x.ndim)
        return (x / scale * self.regen + self.init * self.keep) * scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        blended = self._blend(x, sigma)
        return self.inner(blended, sigma, **extra) + (x - blended)

    def denoise_with_uncond(self, x: torch.Tensor, sigma: torch.Tensor, *, cond_scale_multiplier: float = 1.0,
                            **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        blended = self._blend(x, sigma)
        guided, uncond = self.inner.denoise_with_uncond(blended, sigma, cond_scale_multiplier=cond_scale_multiplier,
                                                        **extra)
        return guided + (x - blended), uncond + (x - blended)
