import pytest
import torch
import torch.nn.functional as F

from sdserver.errors import ModelLoadError
from sdserver.upscalers.compact import build_compact


def reference_forward(sd, x, num_conv, scale):
    t = x
    for i in range(num_conv + 1):
        t = F.conv2d(t, sd[f"body.{2 * i}.weight"], sd[f"body.{2 * i}.bias"], padding=1)
        t = F.prelu(t, sd[f"body.{2 * i + 1}.weight"])
    last = 2 * num_conv + 2
    t = F.conv2d(t, sd[f"body.{last}.weight"], sd[f"body.{last}.bias"], padding=1)
    return F.pixel_shuffle(t, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")


@pytest.mark.parametrize("scale", [2, 4])
def test_compact_matches_reference(compact_sd, scale):
    sd = compact_sd(num_conv=3, scale=scale)
    net = build_compact(sd)
    assert net.scale == scale
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(out, reference_forward(sd, x, 3, scale))
    assert out.shape == (1, 3, 5 * scale, 6 * scale)


def test_zero_residual_is_nearest_upscale(compact_sd):
    sd = {k: torch.zeros_like(v) if k.endswith("bias") or v.ndim == 4 else v for k, v in compact_sd().items()}
    x = torch.rand(1, 3, 3, 4)
    with torch.no_grad():
        out = build_compact(sd)(x)
    assert torch.equal(out, x.repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_last_conv_not_a_square_multiple(compact_sd):
    sd = compact_sd(num_conv=1)
    sd["body.4.weight"] = torch.zeros(7, 8, 3, 3)
    sd["body.4.bias"] = torch.zeros(7)
    with pytest.raises(ModelLoadError):
        build_compact(sd)
