"""Prompt styles from A1111's `styles.csv` (no torch).

The file is CSV with a header: `name,prompt,negative_prompt` (quoted fields allowed; the pre-2023 column
`text` is read as `prompt`). Rows with an empty name or a name starting with `#` are skipped. A style's text
replaces `{prompt}` with the user's prompt, or else is appended after ", ". Styles apply in the order named,
before comments, extra networks and everything else. Facts from A1111's `modules/styles.py`; our own code.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sdserver.errors import InvalidRequest

log = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"
_LISTED_IN_ERRORS = 20  # style names quoted in an error; a styles file can hold hundreds


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: str | None = None  # the file it came from


def load_styles(path: str | Path) -> dict[str, Style]:
    """Read one styles file; a missing file has no styles. A later row with the same name wins."""
    path = Path(path)
    if not path.is_file():
        return {}
    # utf-8-sig: files saved by A1111 (and by Excel) start with a BOM.
    with path.open("r", encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, skipinitialspace=True)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            log.warning("styles file %s has no 'name' column; no styles read from it", path)
            return {}
        styles: dict[str, Style] = {}
        for row in reader:
            name = row.get("name") or ""
            if not name or name.startswith("#"):
                continue
            prompt = row.get("prompt") if "prompt" in row else row.get("text")
            styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "", str(path))
        return styles


def load_styles_files(paths: Iterable[str | Path]) -> dict[str, Style]:
    """Several styles files (A1111's repeated `--styles-file`); later files win on equal names."""
    styles: dict[str, Style] = {}
    for path in paths:
        styles.update(load_styles(path))
    return styles


def merge_style(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt: `{prompt}` replaced, or the two joined by ", " (empties dropped)."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(
    prompt: str, negative_prompt: str, names: Sequence[str], styles: Mapping[str, Style]
) -> tuple[str, str]:
    """Apply the named styles in order to the prompt and negative prompt. An unknown name raises
    InvalidRequest naming `styles` (A1111 silently ignores it; a typo should not go unnoticed)."""
    unknown = [name for name in names if name not in styles]
    if unknown:
        known = ", ".join(repr(name) for name in list(styles)[:_LISTED_IN_ERRORS]) or "none"
        if len(styles) > _LISTED_IN_ERRORS:
            known += ", ..."
        raise InvalidRequest(f"unknown style {unknown[0]!r}; known styles: {known}", field="styles")
    for name in names:
        style = styles[name]
        prompt = merge_style(style.prompt, prompt)
        negative_prompt = merge_style(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
