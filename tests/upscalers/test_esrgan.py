import pytest
import torch
import torch.nn.functional as F

from sdserver.errors import ModelLoadError
from sdserver.upscalers.esrgan import build_rrdbnet


def reference_forward(sd, x, nb, n_up):
    """ESRGAN's forward written directly over the original key layout."""

    def conv(t, key):
        return F.conv2d(t, sd[f"{key}.weight"], sd[f"{key}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    fea = conv(x, "model.0")
    t = fea
    for i in range(nb):
        block_in = t
        for r in (1, 2, 3):
            p = f"model.1.sub.{i}.RDB{r}"
            feats = [t]
            for j in range(1, 5):
                feats.append(lrelu(conv(torch.cat(feats, 1), f"{p}.conv{j}.0")))
            t = conv(torch.cat(feats, 1), f"{p}.conv5.0") * 0.2 + feats[0]
        t = t * 0.2 + block_in
    t = fea + conv(t, f"model.1.sub.{nb}")
    for u in range(n_up):
        t = lrelu(conv(F.interpolate(t, scale_factor=2, mode="nearest"), f"model.{3 + 3 * u}"))
    t = lrelu(conv(t, f"model.{2 + 3 * n_up}"))
    return conv(t, f"model.{4 + 3 * n_up}")


@pytest.mark.parametrize("n_up,scale", [(1, 2), (2, 4), (3, 8)])
def test_old_layout_matches_reference_and_scale(old_esrgan, n_up, scale):
    sd = old_esrgan(nb=2, n_up=n_up)
    net = build_rrdbnet(sd)
    assert net.scale == scale
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(sd, x, nb=2, n_up=n_up)
    assert out.shape == (1, 3, 6 * scale, 5 * scale)
    torch.testing.assert_close(out, ref)


def test_realesrgan_layout_equals_old_layout(old_esrgan, realesrgan):
    old, new = build_rrdbnet(old_esrgan(seed=3)), build_rrdbnet(realesrgan(seed=3))
    x = torch.rand(1, 3, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x))


def test_new_esrgan_layout_names(old_esrgan, realesrgan):
    """xinntao's "new arch" ESRGAN names (RRDB_trunk, trunk_conv, upconvN, HRconv)."""
    sd = realesrgan(seed=5)
    renamed = {}
    for key, value in sd.items():
        key = key.replace("conv_body", "trunk_conv")
        if key.startswith("body."):
            key = "RRDB_trunk." + key[len("body.") :].replace(".rdb", ".RDB")
        key = key.replace("conv_up", "upconv").replace("conv_hr", "HRconv")
        renamed[key] = value
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(build_rrdbnet(renamed)(x), build_rrdbnet(old_esrgan(seed=5))(x))


@pytest.mark.parametrize("unshuffle,in_ch,scale", [(2, 12, 2), (4, 48, 1)])
def test_pixel_unshuffle_variants(old_esrgan, unshuffle, in_ch, scale):
    sd = old_esrgan(in_ch=in_ch, n_up=2)
    net = build_rrdbnet(sd)
    assert net.scale == scale
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        ref = reference_forward(sd, F.pixel_unshuffle(x, unshuffle), nb=1, n_up=2)
        torch.testing.assert_close(net(x), ref)
        # Sides that don't divide by the unshuffle factor still give scale × the input size.
        assert net(torch.rand(1, 3, 5, 7)).shape == (1, 3, 5 * scale, 7 * scale)


def test_wrong_shapes_are_a_load_error(old_esrgan):
    sd = old_esrgan()
    sd["model.1.sub.0.RDB2.conv3.0.weight"] = torch.zeros(4, 5, 3, 3)
    with pytest.raises(ModelLoadError):
        build_rrdbnet(sd)


def test_stray_tensor_is_a_load_error(old_esrgan):
    sd = old_esrgan()
    sd["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError):
        build_rrdbnet(sd)
