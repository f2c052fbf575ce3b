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


@dataclass(frozen=True)
class Guidance:
    conds: tuple[PromptConditioning, ...]  # one per image of the batch
    unconds: tuple[PromptConditioning, ...]
    cfg_scale: float
    s_min_uncond: float = 0.0
    image_cond: torch.Tensor | None = None  # [B, C, h, w] extra UNet input channels (inpainting models)


class CFGDenoiser:
    """Counts its calls: A1111's prompt schedules refer to denoiser calls, not sampler steps."""

    def __init__(self, denoiser: DenoiseRows, guidance: Guidance, vector_cond: VectorCond | None = None) -> None:
        self.denoiser = denoiser
        self.guidance = guidance
        self.vector_cond = vector_cond
        self.step = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        return self.denoise_with_uncond(x, sigma, cond_scale_multiplier=1.0)[0]

    def denoise_with_uncond(
        self, x: torch.Tensor, sigma: torch.Tensor, *, cond_scale_multiplier: float = 1.0, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.guidance
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        skip_uncond = g.s_min_uncond > 0 and self.step % 2 == 1 and float(sigma.max()) < g.s_min_uncond
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
