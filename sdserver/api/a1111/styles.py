"""A1111's `styles.csv`: named prompt fragments (`name,prompt,negative_prompt`, `{prompt}` placeholder)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from sdserver.errors import InvalidRequest


@dataclass(frozen=True)
class PromptStyle:
    """One `styles.csv` row."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def parse_styles_csv(text: str) -> dict[str, PromptStyle]:
    """Rows keyed by name, in file order. A1111's header is `name,prompt,negative_prompt`; extra columns
    are ignored and a missing column reads as empty. Rows without a name are skipped."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")), skipinitialspace=True)
    if reader.fieldnames is None or "name" not in reader.fieldnames:
        raise InvalidRequest("styles.csv needs a header row with a 'name' column", field="styles")
    styles: dict[str, PromptStyle] = {}
    for row in reader:
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = PromptStyle(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def read_styles_csv(path: Path | str) -> dict[str, PromptStyle]:
    """The styles in `path`; an absent file means no styles (A1111 starts without one)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return parse_styles_csv(path.read_text(encoding="utf-8-sig"))
