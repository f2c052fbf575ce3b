"""Running an upscaling network over an image in tiles, so a 2048 px input needs only tile-sized activations.

Each tile is run with `pad` pixels of surrounding context and only its own centre is kept, so tiles meet without
visible seams and without blending. The output is written straight into a uint8 array: the only full-size
buffer is the result itself.

Colour order and rounding follow A1111's upscaler path: the network sees BGR in [0, 1] (ESRGAN models were
trained on OpenCV images) and its output is clamped, scaled by 255 and rounded.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


def _tile_starts(size: int, tile: int) -> range:
    return range(0, size, tile)


@torch.inference_mode()
def upscale_tiled(
    net: nn.Module,
    image: Image.Image,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    tile: int = 192,
    pad: int = 16,
) -> Image.Image:
    """`net` (with an int `scale`) applied to `image`; returns an RGB image `scale` times larger."""
    scale = int(net.scale)  # type: ignore[arg-type]
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    h, w = bgr.shape[:2]
    if tile <= 0:  # 0 disables tiling, as A1111's ESRGAN_tile
        tile = max(h, w)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    for y0 in _tile_starts(h, tile):
        y1 = min(y0 + tile, h)
        cy0, cy1 = max(y0 - pad, 0), min(y1 + pad, h)
        for x0 in _tile_starts(w, tile):
            x1 = min(x0 + tile, w)
            cx0, cx1 = max(x0 - pad, 0), min(x1 + pad, w)
            patch = torch.from_numpy(bgr[cy0:cy1, cx0:cx1].transpose(2, 0, 1).copy())
            patch = (patch.to(device=device, dtype=dtype) / 255.0).unsqueeze(0)
            result = net(patch)[0]
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            result = result[:, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale]
            pixels = (result.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
            out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = pixels.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]), "RGB")
