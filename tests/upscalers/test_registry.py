import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdserver.errors import InvalidRequest, ModelLoadError, UnsafeCheckpoint
from sdserver.upscalers.registry import UpscalerRegistry


def _image(w: int, h: int) -> Image.Image:
    gen = torch.Generator().manual_seed(w * 1000 + h)
    return Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy(), "RGB")


def _dirs(root: Path) -> dict[str, list[Path]]:
    dirs = {kind: [root / kind] for kind in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")}
    for folders in dirs.values():
        folders[0].mkdir(parents=True, exist_ok=True)
    return dirs


class CountingLoader:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, path):
        self.calls.append(Path(path).name)
        return self.inner(path)


def _real_loader():
    from sdserver.models.files import load_state_dict

    return load_state_dict


def test_listing_order_names_and_fields(tmp_path, old_esrgan, compact_sd):
    dirs = _dirs(tmp_path)
    save_file(old_esrgan(), str(dirs["ESRGAN"][0] / "4x_foo.safetensors"))
    torch.save(old_esrgan(), dirs["ESRGAN"][0] / "Bar.pth")
    (dirs["ESRGAN"][0] / "notes.txt").write_text("not a model")
    save_file(compact_sd(), str(dirs["RealESRGAN"][0] / "realesr-general-x4v3.safetensors"))
    save_file(compact_sd(scale=2), str(dirs["RealESRGAN"][0] / "my_x2.safetensors"))
    (dirs["SwinIR"][0] / "sub").mkdir()
    save_file({"x": torch.zeros(1)}, str(dirs["SwinIR"][0] / "sub" / "swin.safetensors"))
    reg = UpscalerRegistry(dirs)

    infos = reg.list()
    names = [i.name for i in infos]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert names[3:] == sorted(names[3:], key=str.lower)
    assert set(names[3:]) == {"4x_foo", "Bar", "R-ESRGAN General 4xV3", "my_x2", "swin"}
    by_name = {i.name: i for i in infos}
    assert by_name["None"].model_path is None and by_name["None"].model_name is None
    assert by_name["Bar"].model_name == "ESRGAN_4x"
    assert Path(by_name["Bar"].model_path).is_absolute()
    assert by_name["swin"].model_name == "SwinIR 4x"
    assert all(i.model_url is None for i in infos)

    rs = {m.name: m for m in reg.realesrgan_models()}
    assert set(rs) == {"R-ESRGAN General 4xV3", "my_x2"}
    assert rs["R-ESRGAN General 4xV3"].scale == 4
    assert rs["my_x2"].path.endswith("my_x2.safetensors")


def test_refresh_picks_up_new_files(tmp_path, old_esrgan):
    dirs = _dirs(tmp_path)
    reg = UpscalerRegistry(dirs)
    assert reg.names() == ["None", "Lanczos", "Nearest"]
    save_file(old_esrgan(), str(dirs["ESRGAN"][0] / "late.safetensors"))
    assert not reg.has("late")
    reg.refresh()
    assert reg.has("late")


@pytest.mark.parametrize("name", ["None", "Lanczos", "Nearest"])
@pytest.mark.parametrize("scale", [2, 1.5, 0.5, 1])
def test_builtin_sizes(tmp_path, name, scale):
    reg = UpscalerRegistry(_dirs(tmp_path))
    out = reg.upscale(_image(21, 14), scale, name)
    assert out.size == (int(21 * scale), int(14 * scale))


def test_nearest_is_pixel_repeat(tmp_path):
    img = _image(5, 3)
    out = UpscalerRegistry(_dirs(tmp_path)).upscale(img, 2, "Nearest")
    assert out.getpixel((3, 5)) == img.getpixel((1, 2))


def test_unknown_name_names_the_field(tmp_path):
    reg = UpscalerRegistry(_dirs(tmp_path))
    with pytest.raises(InvalidRequest) as err:
        reg.upscale(_image(8, 8), 2, "R-ESRGAN 9x", field="hr_upscaler")
    assert err.value.field == "hr_upscaler"
    assert "Lanczos" in err.value.message


@pytest.mark.parametrize("layout", ["old", "realesrgan"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_esrgan_file_upscales_to_requested_size(tmp_path, old_esrgan, realesrgan, layout, suffix):
    sd = old_esrgan() if layout == "old" else realesrgan()
    dirs = _dirs(tmp_path)
    path = dirs["ESRGAN"][0] / f"tiny{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    reg = UpscalerRegistry(dirs, loader=_real_loader())
    img = _image(10, 7)
    for scale in (4, 2, 2.5):
        assert reg.upscale(img, scale, "tiny").size == (int(10 * scale), int(7 * scale))


def test_realesrgan_x2plus_and_compact_from_pth(tmp_path, realesrgan, compact_sd):
    dirs = _dirs(tmp_path)
    torch.save(realesrgan(in_ch=12), dirs["RealESRGAN"][0] / "RealESRGAN_x2plus.pth")
    torch.save(compact_sd(), dirs["RealESRGAN"][0] / "realesr-animevideov3.pth")
    reg = UpscalerRegistry(dirs, loader=_real_loader())
    assert {m.name: m.scale for m in reg.realesrgan_models()} == {"R-ESRGAN 2x+": 2, "R-ESRGAN AnimeVideo": 4}
    img = _image(9, 6)
    assert reg.upscale(img, 2, "R-ESRGAN 2x+").size == (18, 12)
    assert reg.upscale(img, 3, "R-ESRGAN AnimeVideo").size == (27, 18)


def test_model_runs_repeatedly_for_scales_above_its_own(tmp_path, compact_sd):
    dirs = _dirs(tmp_path)
    save_file(compact_sd(scale=2), str(dirs["ESRGAN"][0] / "x2.safetensors"))
    calls = []
    reg = UpscalerRegistry(dirs)
    real_network = reg._network

    def spying(entry, device, dtype, field):
        net = real_network(entry, device, dtype, field)
        return _Spy(net, calls)

    reg._network = spying  # type: ignore[method-assign]
    assert reg.upscale(_image(6, 6), 5, "x2").size == (30, 30)
    # 6 → 12 → 24 → 48 (three passes to cover 30), then Lanczos down to 30.
    assert [c[-1] for c in calls] == [6, 12, 24]


class _Spy(torch.nn.Module):
    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls, self.scale = net, calls, net.scale

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.net(x)


def test_loaded_models_are_cached_and_bounded(tmp_path, old_esrgan, compact_sd):
    dirs = _dirs(tmp_path)
    save_file(old_esrgan(), str(dirs["ESRGAN"][0] / "a.safetensors"))
    save_file(compact_sd(), str(dirs["ESRGAN"][0] / "b.safetensors"))
    loader = CountingLoader(_real_loader())
    reg = UpscalerRegistry(dirs, max_loaded=1, loader=loader)
    img = _image(4, 4)
    reg.upscale(img, 4, "a")
    reg.upscale(img, 4, "a")
    assert loader.calls == ["a.safetensors"]
    reg.upscale(img, 4, "b")
    reg.upscale(img, 4, "a")
    assert loader.calls == ["a.safetensors", "b.safetensors", "a.safetensors"]


def test_nested_params_ema_is_unwrapped(tmp_path, realesrgan):
    dirs = _dirs(tmp_path)
    path = dirs["RealESRGAN"][0] / "RealESRGAN_x4plus.pth"
    path.write_bytes(b"placeholder")
    sd = realesrgan()
    reg = UpscalerRegistry(dirs, loader=lambda p: {"params_ema": sd, "params": {}})
    assert reg.upscale(_image(3, 5), 4, "R-ESRGAN 4x+").size == (12, 20)


def test_incomplete_swinir_and_dat_files_are_load_errors(tmp_path):
    dirs = _dirs(tmp_path)
    swin = {"conv_first.weight": torch.zeros(8, 3, 3, 3),
            "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(4, 2)}
    dat = {"conv_first.weight": torch.zeros(8, 3, 3, 3), "before_RG.1.weight": torch.zeros(8)}
    save_file(swin, str(dirs["SwinIR"][0] / "001_classicalSR_x4.safetensors"))
    save_file(dat, str(dirs["DAT"][0] / "DAT_x4.safetensors"))
    reg = UpscalerRegistry(dirs)
    assert reg.has("001_classicalSR_x4") and reg.has("DAT_x4")
    for name, arch in (("001_classicalSR_x4", "SwinIR"), ("DAT_x4", "DAT")):
        with pytest.raises(ModelLoadError) as err:
            reg.upscale(_image(4, 4), 2, name, field="upscaler_1")
        assert err.value.field == "upscaler_1"
        assert f"{name}.safetensors" in err.value.message and arch in err.value.message


def test_unknown_architecture_is_a_load_error(tmp_path):
    dirs = _dirs(tmp_path)
    save_file({"foo.weight": torch.zeros(2)}, str(dirs["ESRGAN"][0] / "odd.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        UpscalerRegistry(dirs).upscale(_image(4, 4), 2, "odd", field="hr_upscaler")
    assert err.value.field == "hr_upscaler"


class _Mkdir:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pth_is_refused_without_running(tmp_path):
    dirs = _dirs(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model.0.weight": _Mkdir(str(marker))}, dirs["ESRGAN"][0] / "evil.pth")
    reg = UpscalerRegistry(dirs, loader=_real_loader())
    with pytest.raises(UnsafeCheckpoint) as err:
        reg.upscale(_image(4, 4), 2, "evil", field="upscaler_1")
    assert err.value.field == "upscaler_1"
    assert not marker.exists()


def test_mismatched_esrgan_file_names_file_and_field(tmp_path, old_esrgan):
    dirs = _dirs(tmp_path)
    sd = old_esrgan()
    sd["model.1.sub.0.RDB1.conv2.0.weight"] = torch.zeros(4, 3, 3, 3)
    save_file(sd, str(dirs["ESRGAN"][0] / "broken.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        UpscalerRegistry(dirs).upscale(_image(4, 4), 2, "broken", field="upscaler_2")
    assert err.value.field == "upscaler_2" and "broken.safetensors" in err.value.message


def test_multiple_of_8_as_a1111s_upscaler(tmp_path):
    reg = UpscalerRegistry(_dirs(tmp_path))
    img = _image(100, 75)
    out = reg.upscale(img, 2, "Lanczos", multiple=8)
    assert out.size == (200, 144)
    # A1111: the upscaler's own resize to 200x150, then Lanczos down to the multiple of 8.
    two_step = img.resize((200, 150), Image.Resampling.LANCZOS).resize((200, 144), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(two_step))
    with pytest.raises(InvalidRequest):
        reg.upscale(_image(3, 3), 2, "Nearest", multiple=8, field="upscaler_1")


def test_replaced_file_is_reloaded_and_deleted_file_is_an_error(tmp_path, old_esrgan, compact_sd):
    dirs = _dirs(tmp_path)
    path = dirs["ESRGAN"][0] / "m.safetensors"
    save_file(compact_sd(scale=4), str(path))
    loader = CountingLoader(_real_loader())
    reg = UpscalerRegistry(dirs, loader=loader)
    assert reg.upscale(_image(4, 4), 1, "m").size == (4, 4)
    reg.upscale(_image(4, 4), 1, "m")
    assert loader.calls == ["m.safetensors"]
    save_file(compact_sd(scale=2), str(path))
    os.utime(path, ns=(1, 1))
    reg.upscale(_image(4, 4), 1, "m")
    assert loader.calls == ["m.safetensors", "m.safetensors"]
    path.unlink()
    with pytest.raises(ModelLoadError) as err:
        reg.upscale(_image(4, 4), 2, "m", field="hr_upscaler")
    assert err.value.field == "hr_upscaler"


def test_real_loader_reads_basicsr_params_ema_pth(tmp_path, realesrgan):
    dirs = _dirs(tmp_path)
    torch.save({"params_ema": realesrgan()}, dirs["RealESRGAN"][0] / "RealESRGAN_x4plus.pth")
    reg = UpscalerRegistry(dirs, loader=_real_loader())
    assert reg.upscale(_image(3, 5), 4, "R-ESRGAN 4x+").size == (12, 20)
