from __future__ import annotations

from pathlib import Path

import pytest

from sdserver.errors import InvalidRequest
from sdserver.pipeline.styles import Style, apply_styles, load_styles, load_styles_files, merge_style

CSV = (
    "\ufeffname,prompt,negative_prompt\n"
    'cinematic,"cinematic still of {prompt}, bokeh","blurry, {prompt}"\n'
    "sharp, highly detailed, lowres\n"
    '"# a comment row",x,y\n'
    ",no name,z\n"
    'quoted,"a ""quoted"" style, with comma",\n'
    "short,only prompt\n"
)


@pytest.fixture
def styles_file(tmp_path: Path) -> Path:
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_load_styles_reads_a1111_csv(styles_file: Path) -> None:
    styles = load_styles(styles_file)
    assert list(styles) == ["cinematic", "sharp", "quoted", "short"]
    assert styles["cinematic"] == Style(
        "cinematic", "cinematic still of {prompt}, bokeh", "blurry, {prompt}", str(styles_file)
    )
    # skipinitialspace: the space after an unquoted comma is not part of the field.
    assert styles["sharp"].prompt == "highly detailed"
    assert styles["sharp"].negative_prompt == "lowres"
    assert styles["quoted"].prompt == 'a "quoted" style, with comma'
    assert styles["quoted"].negative_prompt == ""
    assert styles["short"].negative_prompt == ""


def test_old_text_column_and_missing_files(tmp_path: Path) -> None:
    old = tmp_path / "old.csv"
    old.write_text("name,text\nvintage,sepia photo\n", encoding="utf-8")
    assert load_styles(old) == {"vintage": Style("vintage", "sepia photo", "", str(old))}
    assert load_styles(tmp_path / "absent.csv") == {}
    headless = tmp_path / "headless.csv"
    headless.write_text("title,prompt\nx,y\n", encoding="utf-8")
    assert load_styles(headless) == {}


def test_later_files_win(tmp_path: Path, styles_file: Path) -> None:
    other = tmp_path / "more.csv"
    other.write_text("name,prompt,negative_prompt\nsharp,razor sharp,\n", encoding="utf-8")
    styles = load_styles_files([styles_file, other])
    assert styles["sharp"].prompt == "razor sharp"
    assert "cinematic" in styles


@pytest.mark.parametrize(
    ("style_text", "prompt", "expected"),
    [
        ("cinematic still of {prompt}, bokeh", "a cat", "cinematic still of a cat, bokeh"),
        ("{prompt} and {prompt}", "x", "x and x"),
        ("highly detailed", "a cat", "a cat, highly detailed"),
        ("highly detailed", "  a cat  ", "a cat, highly detailed"),
        ("highly detailed", "", "highly detailed"),
        ("", " a cat ", "a cat"),
        ("{prompt}", "", ""),
    ],
)
def test_merge_style(style_text: str, prompt: str, expected: str) -> None:
    assert merge_style(style_text, prompt) == expected


def test_apply_styles_in_order_to_both_prompts(styles_file: Path) -> None:
    styles = load_styles(styles_file)
    prompt, negative = apply_styles("a cat", "ugly", ["sharp", "cinematic"], styles)
    assert prompt == "cinematic still of a cat, highly detailed, bokeh"
    assert negative == "blurry, ugly, lowres"
    assert apply_styles("a cat", "ugly", [], styles) == ("a cat", "ugly")


def test_unknown_style_is_an_invalid_request_naming_styles(styles_file: Path) -> None:
    with pytest.raises(InvalidRequest) as error:
        apply_styles("a", "", ["sharp", "Sharp"], load_styles(styles_file))
    assert error.value.field == "styles"
    assert "'Sharp'" in error.value.message
    assert "'sharp'" in error.value.message
