"""`save_images: true`: outputs written under the data dir in A1111's folders and file names.

Samples go to `outputs/<kind>-images/YYYY-MM-DD/NNNNN-<seed>.<ext>` and grids to `outputs/<kind>-grids/`,
numbered on from the highest number already in the folder, each carrying its infotext as A1111 writes it.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, PngImagePlugin

_NUMBERED = re.compile(r"^(\d{5})-")


def output_folder(data_dir: Path, opts: Mapping[str, Any], kind: str, *, grid: bool, today: dt.date) -> Path:
    shared = opts.get("outdir_grids" if grid else "outdir_samples") or ""
    folder = Path(shared or opts.get(f"outdir_{kind}_{'grids' if grid else 'samples'}") or f"outputs/{kind}-images")
    if not folder.is_absolute():
        folder = data_dir / folder
    if not grid and opts.get("save_to_dirs", True):
        folder = folder / today.isoformat()
    return folder


def next_number(folder: Path) -> int:
    """One past the highest NNNNN- prefix in the folder (A1111's get_next_sequence_number)."""
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_image(image: Image.Image, path: Path, infotext: str | None, fmt: str, quality: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        image.save(path, format="PNG", pnginfo=info)
    else:
        save_format = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(fmt, fmt.upper())
        image.convert("RGB").save(path, format=save_format, quality=quality)
        if infotext:
            path.with_suffix(".txt").write_text(infotext, encoding="utf-8")
    return path


def save_outputs(
    pictures: Sequence[Image.Image], infotexts: Sequence[str], seeds: Sequence[int], *, grid_first: bool,
    kind: str, data_dir: Path, opts: Mapping[str, Any], today: dt.date | None = None,
) -> list[Path]:
    """Write a generation's images (and its grid, when the response carries one first) to disk."""
    today = today or dt.date.today()
    fmt = str(opts.get("samples_format", "png")).lower()
    quality = int(opts.get("jpeg_quality", 80))
    saved = []
    items = list(zip(pictures, infotexts))
    if grid_first:
        grid, text = items.pop(0)
        folder = output_folder(data_dir, opts, kind, grid=True, today=today)
        saved.append(save_image(grid, folder / f"grid-{next_number(folder):05}.{fmt}", text, fmt, quality))
    folder = output_folder(data_dir, opts, kind, grid=False, today=today)
    number = next_number(folder)
    for (picture, text), seed in zip(items, seeds):
        saved.append(save_image(picture, folder / f"{number:05}-{seed}.{fmt}", text, fmt, quality))
        number += 1
    return saved
