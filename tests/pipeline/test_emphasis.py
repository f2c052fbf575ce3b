from __future__ import annotations

import pytest
import torch

from sdserver.errors import InvalidRequest
from sdserver.pipeline.emphasis import (
    EmphasisMode,
    apply_emphasis,
    emphasis_infotext,
    parse_emphasis_mode,
    weights_for_mode,
)


def test_original_multiplies_then_restores_the_mean_by_hand() -> None:
    # One item, two tokens, one channel: z = [2, 4] (mean 3), weights [1, 2] -> [2, 8] (mean 5).
    z = torch.tensor([[[2.0], [4.0]]])
    out = apply_emphasis(z, torch.tensor([[1.0, 2.0]]), "Original")
    assert torch.allclose(out, torch.tensor([[[2.0 * 3 / 5], [8.0 * 3 / 5]]]))


def test_original_keeps_the_mean_over_the_whole_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.rand(2, 77, 8, generator=generator) + 0.5
    multipliers = torch.ones(2, 77)
    multipliers[0, 3] = 1.5
    multipliers[1, 10:20] = 0.7
    out = apply_emphasis(z, multipliers, EmphasisMode.ORIGINAL)
    assert torch.allclose(out.mean(), z.mean())
    # Each token's direction is unchanged; only its scale moved.
    ratio = out / z
    scale = z.mean() / (z * multipliers.unsqueeze(-1)).mean()
    assert torch.allclose(ratio, (multipliers * scale).unsqueeze(-1).expand_as(z))


def test_no_norm_only_multiplies() -> None:
    z = torch.tensor([[[2.0, -1.0], [4.0, 3.0]]])
    out = apply_emphasis(z, torch.tensor([[1.0, 2.0]]), "No norm")
    assert torch.equal(out, torch.tensor([[[2.0, -1.0], [8.0, 6.0]]]))


@pytest.mark.parametrize("mode", ["Ignore", "None"])
def test_ignore_and_none_leave_the_output_alone(mode: str) -> None:
    z = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(1))
    multipliers = torch.full((1, 77), 1.3)
    assert torch.equal(apply_emphasis(z, multipliers, mode), z)


def test_all_ones_is_a_no_op_for_original() -> None:
    z = torch.randn(2, 77, 4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(apply_emphasis(z, torch.ones(2, 77), "Original"), z)


def test_weights_for_mode() -> None:
    text = "a (b) BREAK [c]"
    # " BREAK " is its own plain run, so empty parts surround the marker.
    parsed = [("a ", 1.0), ("b", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("c", 1 / 1.1)]
    assert weights_for_mode(text, "Original") == parsed
    assert weights_for_mode(text, "No norm") == parsed
    # Same parts (tokenized one by one, so not merged), every weight 1 but the marker's.
    ignored = [("a ", 1.0), ("b", 1.0), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("c", 1.0)]
    assert weights_for_mode(text, "Ignore") == ignored
    assert weights_for_mode(text, "None") == [(text, 1.0)]


def test_parse_emphasis_mode_rejects_unknown_values_naming_the_field() -> None:
    assert parse_emphasis_mode("No norm") is EmphasisMode.NO_NORM
    with pytest.raises(InvalidRequest) as error:
        parse_emphasis_mode("original")
    assert error.value.field == "emphasis"
    assert "'Original'" in error.value.message


def test_emphasis_infotext() -> None:
    assert emphasis_infotext(["a (b)"], "Original") is None
    assert emphasis_infotext(["a (b)"], "No norm") == "No norm"
    assert emphasis_infotext(["plain", "x [y]"], "None") == "None"
    assert emphasis_infotext(["plain"], "Ignore") is None
