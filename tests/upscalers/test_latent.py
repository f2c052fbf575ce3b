import pytest
import torch

from sdserver.errors import InvalidRequest
from sdserver.upscalers.latent import LATENT_MODES, is_latent_mode, upscale_latent

A1111_MODES = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
]


def test_modes_are_a1111s_in_order_and_immutable():
    assert list(LATENT_MODES) == A1111_MODES
    with pytest.raises(TypeError):
        LATENT_MODES["Latent (mine)"] = LATENT_MODES["Latent"]  # type: ignore[index]


@pytest.mark.parametrize("mode", A1111_MODES)
@pytest.mark.parametrize("size", [(16, 12), (13, 9), (4, 4)])
def test_every_mode_gives_the_requested_size(mode, size):
    latent = torch.randn(2, 4, 8, 6)
    out = upscale_latent(latent, size[0], size[1], mode)
    assert out.shape == (2, 4, size[1], size[0])
    assert out.dtype == latent.dtype


@pytest.mark.parametrize("mode", A1111_MODES)
def test_half_precision_on_cpu(mode):
    out = upscale_latent(torch.randn(1, 4, 4, 4, dtype=torch.float16), 8, 8, mode)
    assert out.dtype == torch.float16 and out.shape == (1, 4, 8, 8)


def test_nearest_doubling_repeats_cells():
    latent = torch.randn(1, 4, 3, 5)
    out = upscale_latent(latent, 10, 6, "Latent (nearest)")
    assert torch.equal(out, latent.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_antialias_changes_downscaling_only_for_antialiased_modes():
    latent = torch.randn(1, 4, 16, 16)
    plain = upscale_latent(latent, 5, 5, "Latent")
    smooth = upscale_latent(latent, 5, 5, "Latent (antialiased)")
    assert not torch.allclose(plain, smooth)


def test_unknown_mode_names_the_field():
    assert not is_latent_mode("Lanczos")
    with pytest.raises(InvalidRequest) as err:
        upscale_latent(torch.zeros(1, 4, 2, 2), 4, 4, "Latent (cubic)", field="hr_upscaler")
    assert err.value.field == "hr_upscaler"
    assert "Latent (bicubic)" in err.value.message
