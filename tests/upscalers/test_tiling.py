import numpy as np
import torch
from PIL import Image

from sdserver.upscalers.compact import build_compact
from sdserver.upscalers.esrgan import build_rrdbnet
from sdserver.upscalers.tiling import upscale_tiled


def _image(w, h, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy(), "RGB")


class _ShapeSpy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.scale, self.shapes = net, net.scale, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return self.net(x)


def _diff(a, b):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()


def test_tiles_with_enough_context_equal_one_pass(compact_sd):
    # Receptive field of this net: 4 convs → 4 px; 6 px of context covers it.
    net = build_compact(compact_sd(num_conv=2, scale=2))
    img = _image(37, 29)
    whole = upscale_tiled(net, img, device="cpu", dtype=torch.float32, tile=0)
    tiled = upscale_tiled(net, img, device="cpu", dtype=torch.float32, tile=8, pad=6)
    assert whole.size == tiled.size == (74, 58)
    assert _diff(whole, tiled) <= 1


def test_rrdb_tiles_match_one_pass(old_esrgan):
    net = build_rrdbnet(old_esrgan())
    img = _image(30, 26, seed=1)
    whole = upscale_tiled(net, img, device="cpu", dtype=torch.float32, tile=0)
    tiled = upscale_tiled(net, img, device="cpu", dtype=torch.float32, tile=12, pad=22)
    assert _diff(whole, tiled) <= 1


def test_network_never_sees_more_than_a_padded_tile(compact_sd):
    spy = _ShapeSpy(build_compact(compact_sd(nf=4, num_conv=1, scale=2)))
    out = upscale_tiled(spy, _image(100, 70), device="cpu", dtype=torch.float32, tile=32, pad=4)
    assert out.size == (200, 140)
    assert max(max(s) for s in spy.shapes) <= 32 + 2 * 4
    assert len(spy.shapes) == 4 * 3


def test_colour_order_reaches_the_network_as_bgr(compact_sd):
    """A1111 feeds ESRGAN-family models BGR; with a zero residual the output is the input, so a swapped
    conversion on either side would still round-trip. Check the network's own input instead."""
    seen = []

    class Probe(torch.nn.Module):
        scale = 1

        def forward(self, x):
            seen.append(x[0, :, 0, 0].tolist())
            return x

    img = Image.new("RGB", (2, 2), (255, 0, 0))
    out = upscale_tiled(Probe(), img, device="cpu", dtype=torch.float32)
    assert seen[0] == [0.0, 0.0, 1.0]
    assert out.getpixel((0, 0)) == (255, 0, 0)
