"""Tiny random upscaler state dicts in each on-disk key layout, written independently of the model code."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from sdserver.errors import ModelLoadError
from sdserver.models.files import load_state_dict
from sdserver.upscalers.registry import UpscalerRegistry
from sdserver.upscalers.tiling import upscale_tiled

StateDict = dict[str, torch.Tensor]


def _conv(sd: StateDict, key: str, cin: int, cout: int, gen: torch.Generator) -> None:
    sd[f"{key}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
    sd[f"{key}.bias"] = torch.randn(cout, generator=gen) * 0.01


def make_old_esrgan(nf: int = 8, nb: int = 1, gc: int = 4, n_up: int = 2, in_ch: int = 3, seed: int = 0) -> StateDict:
    """Original ESRGAN: a flattened nn.Sequential [conv, trunk, (upsample, conv, lrelu)*n, conv, lrelu, conv]."""
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}
    _conv(sd, "model.0", in_ch, nf, gen)
    for i in range(nb):
        for r in (1, 2, 3):
            for j in range(1, 6):
                _conv(sd, f"model.1.sub.{i}.RDB{r}.conv{j}.0", nf + (j - 1) * gc, gc if j < 5 else nf, gen)
    _conv(sd, f"model.1.sub.{nb}", nf, nf, gen)
    for u in range(n_up):
        _conv(sd, f"model.{3 + 3 * u}", nf, nf, gen)
    _conv(sd, f"model.{2 + 3 * n_up}", nf, nf, gen)
    _conv(sd, f"model.{4 + 3 * n_up}", nf, 3, gen)
    return sd


def old_to_realesrgan(sd: StateDict, nb: int, n_up: int) -> StateDict:
    """The same tensors under Real-ESRGAN (BasicSR) names."""
    out: StateDict = {}
    for key, value in sd.items():
        parts = key.split(".")
        kind = parts[-1]
        if key.startswith("model.1.sub.") and ".RDB" in key:
            i, rdb, conv = parts[3], parts[4][3:], parts[5]
            out[f"body.{i}.rdb{rdb}.{conv}.{kind}"] = value
        elif key.startswith(f"model.1.sub.{nb}."):
            out[f"conv_body.{kind}"] = value
        else:
            idx = int(parts[1])
            if idx == 0:
                name = "conv_first"
            elif idx == 2 + 3 * n_up:
                name = "conv_hr"
            elif idx == 4 + 3 * n_up:
                name = "conv_last"
            else:
                name = f"conv_up{(idx - 3) // 3 + 1}"
            out[f"{name}.{kind}"] = value
    return out


def make_compact(nf: int = 8, num_conv: int = 2, scale: int = 4, seed: int = 0) -> StateDict:
    """SRVGGNetCompact: convs at even body indices, PReLU slopes at odd ones."""
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}
    _conv(sd, "body.0", 3, nf, gen)
    sd["body.1.weight"] = torch.full((nf,), 0.25)
    for i in range(num_conv):
        _conv(sd, f"body.{2 + 2 * i}", nf, nf, gen)
        sd[f"body.{3 + 2 * i}.weight"] = torch.full((nf,), 0.25)
    _conv(sd, f"body.{2 + 2 * num_conv}", nf, 3 * scale * scale, gen)
    return sd


@pytest.fixture
def old_esrgan() -> Callable[..., StateDict]:
    return make_old_esrgan


@pytest.fixture
def realesrgan() -> Callable[..., StateDict]:
    def build(nf: int = 8, nb: int = 1, gc: int = 4, n_up: int = 2, in_ch: int = 3, seed: int = 0) -> StateDict:
        return old_to_realesrgan(make_old_esrgan(nf, nb, gc, n_up, in_ch, seed), nb, n_up)

    return build


@pytest.fixture
def compact_sd() -> Callable[..., StateDict]:
    return make_compact


# --- a state dict written into a model folder and used through the registry ---------------------------------------


def random_image(w: int, h: int) -> Image.Image:
    gen = torch.Generator().manual_seed(w * 100 + h)
    return Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy(), "RGB")


def _registry_over(folder: Path, kind: str, sd: StateDict, filename: str) -> UpscalerRegistry:
    folder.mkdir(exist_ok=True)
    path = folder / filename
    # BasicSR-trained .pth releases nest the weights under params / params_ema.
    save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save({"params": sd}, path)
    return UpscalerRegistry({kind: [folder]}, loader=load_state_dict)


@pytest.fixture
def file_round_trip(tmp_path: Path) -> Callable[..., tuple[UpscalerRegistry, Image.Image]]:
    """`run(kind, net, sd, suffix)`: write `sd` as models/<kind>/tiny<suffix>, upscale an 11x7 image (not a
    multiple of any window) through the registry, and check it equals running `net` tiled."""

    def run(kind: str, net: nn.Module, sd: StateDict, suffix: str) -> tuple[UpscalerRegistry, Image.Image]:
        reg = _registry_over(tmp_path / kind, kind, sd, f"tiny{suffix}")
        img = random_image(11, 7)
        out = reg.upscale(img, net.scale, "tiny")
        assert out.size == (11 * net.scale, 7 * net.scale)
        expected = upscale_tiled(net, img, device="cpu", dtype=torch.float32)
        assert np.array_equal(np.asarray(out), np.asarray(expected))
        return reg, img

    return run


@pytest.fixture
def file_load_error(tmp_path: Path) -> Callable[[str, StateDict, str], ModelLoadError]:
    """`run(kind, sd, field)`: the error upscaling through models/<kind>/broken.safetensors raises."""

    def run(kind: str, sd: StateDict, field: str) -> ModelLoadError:
        reg = _registry_over(tmp_path / kind, kind, sd, "broken.safetensors")
        with pytest.raises(ModelLoadError) as err:
            reg.upscale(random_image(8, 8), 2, "broken", field=field)
        return err.value

    return run
