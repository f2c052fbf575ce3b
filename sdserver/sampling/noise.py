"""Seeded noise with A1111 1.10 parity (`modules/rng.py`, `modules/rng_philox.py`, k-diffusion's Brownian tree).

Sources: "cpu" (a torch CPU generator, then moved to the device: portable, A1111's "CPU"), "gpu" (a generator
on the compute device: A1111's "GPU"), "nv" (a NumPy Philox4x32-10 + Box-Muller reproduction of CUDA
`torch.randn`, so NVIDIA noise can be made on any device: A1111's "NV").

Each image owns its generator, so image i of a batch equals a single run with that image's seed.
All randomness a sampler needs reaches it through a noise sampler built here; no sampler calls torch.randn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torchsde
from torch import Tensor

from sdserver.errors import InvalidRequest

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
SOURCES = ("cpu", "gpu", "nv")

# Philox4x32 round multipliers and Weyl key increments (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", 2011), the constants CUDA's curand uses.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUNDS = 10
# CUDA's uniform scaling: u = bits * 2^-32 + 2^-33 (never 0), in float32 constants; the angle uses 2*pi
# folded into the constant. A1111 evaluates the rest in float64 and rounds the result to float32.
_U32_SCALE = np.float32(2.3283064e-10)
_U32_SCALE_2PI = np.float32(2.3283064e-10 * 6.2831855)
# Seed resize works in pixels; SD latents are 1/8 of the image size.
LATENT_FACTOR = 8


def _mul_hi_lo(a: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    prod = a.astype(np.uint64) * np.uint64(m)
    return (prod >> np.uint64(32)).astype(np.uint32), (prod & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox4x32(counter: np.ndarray, seed: int, rounds: int = _PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32 on a (4, N) uint32 counter block with the 64-bit key `seed`; returns (4, N) uint32."""
    key = seed % (1 << 64)
    k0, k1 = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)
    c0, c1, c2, c3 = (np.array(row, dtype=np.uint32) for row in counter)
    for r in range(rounds):
        if r:
            k0 = np.uint32((int(k0) + _PHILOX_W0) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + _PHILOX_W1) & 0xFFFFFFFF)
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3])


def _box_muller_first(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    u = a.astype(np.float64) * np.float64(_U32_SCALE) + np.float64(_U32_SCALE / 2)
    v = b.astype(np.float64) * np.float64(_U32_SCALE_2PI) + np.float64(_U32_SCALE_2PI / 2)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """CUDA-style normal numbers on the CPU. Each `randn` call uses the next counter offset, as A1111's NV."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        # One element per counter lane; a tensor past 2^32 elements would need counter[3] too.
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        bits = philox4x32(counter, self.seed)
        return _box_muller_first(bits[0], bits[1]).reshape(tuple(shape))


class _Stream(Protocol):
    def randn(self, shape: Sequence[int]) -> Tensor: ...


@dataclass
class _TorchStream:
    generator: torch.Generator
    out_device: torch.device

    def randn(self, shape: Sequence[int]) -> Tensor:
        x = torch.randn(tuple(shape), generator=self.generator, device=self.generator.device)
        return x.to(self.out_device)


@dataclass
class _PhiloxStream:
    generator: PhiloxGenerator
    out_device: torch.device

    def randn(self, shape: Sequence[int]) -> Tensor:
        return torch.from_numpy(self.generator.randn(shape)).to(self.out_device)


def make_stream(seed: int, source: str, device: torch.device | str = "cpu") -> _Stream:
    """A seeded generator of normal tensors; later calls continue the same stream."""
    out = torch.device(device)
    if source == "nv":
        return _PhiloxStream(PhiloxGenerator(seed), out)
    if source == "cpu" or out.type == "mps":  # A1111: MPS always draws on the CPU
        return _TorchStream(torch.Generator("cpu").manual_seed(int(seed)), out)
    if source == "gpu":
        return _TorchStream(torch.Generator(out).manual_seed(int(seed)), out)
    raise InvalidRequest(f"unknown noise source {source!r}; expected one of {SOURCES}", field="randn_source")


def randn(seed: int, shape: Sequence[int], source: str = "cpu", device: torch.device | str = "cpu") -> Tensor:
    """The first normal tensor of `seed`'s stream (A1111 `rng.randn` / `randn_local`)."""
    return make_stream(seed, source, device).randn(shape)


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's slerp for variation seeds, quirks included.

    Vectors are normalised along dim 1 (the latent height for a [C, H, W] noise), so the angle is taken per
    (channel, column). When the mean cosine exceeds 0.9995 it falls back to `low * val + high * (1 - val)`:
    note the weights are the reverse of the slerp branch's.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def paste_centred(target: Tensor, source: Tensor) -> Tensor:
    """Copy `source` [C, h, w] into the centre of `target` [C, H, W], cropping whichever is larger."""
    dx = (target.shape[2] - source.shape[2]) // 2
    dy = (target.shape[1] - source.shape[1]) // 2
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = target.clone()
    out[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return out


class ImageRNG:
    """Per-image noise for one batch (A1111's `rng.ImageRNG`).

    `shape` is one image's latent shape [C, H, W]. The first draw is the starting noise (with variation seed
    slerp and seed resize); each later `next()` continues every image's own generator, as ancestral steps do.
    With `ensd` != 0 the generators are re-seeded with seed + ensd right after the first draw.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        source: str = "cpu",
        device: torch.device | str = "cpu",
        ensd: int = 0,
    ) -> None:
        if source not in SOURCES:
            raise InvalidRequest(f"unknown noise source {source!r}; expected one of {SOURCES}", field="randn_source")
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.source = source
        self.device = torch.device(device)
        self.ensd = int(ensd or 0)
        self._streams = [make_stream(s, source, self.device) for s in self.seeds]
        self._first_done = False

    def _noise_shape(self) -> tuple[int, ...]:
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // LATENT_FACTOR, self.seed_resize_from_w // LATENT_FACTOR)

    def _first_for(self, i: int, seed: int, stream: _Stream) -> Tensor:
        noise_shape = self._noise_shape()
        resized = noise_shape != self.shape
        noise = randn(seed, noise_shape, self.source, self.device) if resized else stream.randn(self.shape)
        if self.subseeds is not None and self.subseed_strength != 0:
            subseed = self.subseeds[i] if i < len(self.subseeds) else 0
            subnoise = randn(subseed, noise_shape, self.source, self.device)
            noise = slerp(self.subseed_strength, noise, subnoise)
        if resized:
            noise = paste_centred(stream.randn(self.shape), noise)
        return noise

    def first(self) -> Tensor:
        """The starting noise, stacked [B, C, H, W]."""
        xs = [self._first_for(i, seed, stream) for i, (seed, stream) in enumerate(zip(self.seeds, self._streams))]
        if self.ensd:
            self._streams = [make_stream(s + self.ensd, self.source, self.device) for s in self.seeds]
        self._first_done = True
        return torch.stack(xs)

    def next(self) -> Tensor:
        """The first draw on the first call; afterwards the next tensor of each image's generator."""
        if not self._first_done:
            return self.first()
        return torch.stack([stream.randn(self.shape) for stream in self._streams])


def rng_noise_sampler(rng: ImageRNG) -> NoiseSampler:
    """Ancestral / churn noise: each call is one `rng.next()` (A1111's TorchHijack.randn_like)."""

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return rng.next()

    return sample


class BrownianTreeNoiseSampler:
    """One torchsde Brownian tree per image seed over [sigma_min, sigma_max] (k-diffusion's
    BatchedBrownianTree / BrownianTreeNoiseSampler, MIT), so SDE noise does not depend on the batch.

    Returns unit-variance noise for the step sigma -> sigma_next: (W(sigma_next) - W(sigma)) / sqrt(|dsigma|).
    """

    def __init__(self, x: Tensor, sigma_min: Tensor | float, sigma_max: Tensor | float, seeds: Sequence[int]) -> None:
        if len(seeds) != x.shape[0]:
            raise ValueError(f"need one seed per image: {len(seeds)} seeds for a batch of {x.shape[0]}")
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros_like(x[0])
        self._trees = [torchsde.BrownianTree(lo, w0, hi, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        return w / (t1 - t0).abs().sqrt()
