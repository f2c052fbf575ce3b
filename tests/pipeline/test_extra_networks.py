from __future__ import annotations

import pytest

from sdserver.errors import InvalidRequest
from sdserver.pipeline.extra_networks import (
    ExtraNetworkCall,
    LoraCall,
    lora_calls,
    parse_extra_networks,
    parse_extra_networks_batch,
)


def test_tags_are_removed_and_returned_in_order() -> None:
    text, calls = parse_extra_networks("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert text == "1girl,   "
    assert calls == [
        ExtraNetworkCall("hypernet", ("agm", "1.1")),
        ExtraNetworkCall("extrasupernet", ("master", "12", "13", "14")),
        ExtraNetworkCall("hypernet", ("ray",)),
    ]


def test_text_that_is_not_a_tag_stays() -> None:
    for prompt in ["a <b> c", "<lora:>", "<my-net:x>", "a < lora:x>", "(a:1.2) <3"]:
        assert parse_extra_networks(prompt) == (prompt, [])


def test_named_and_positional_items() -> None:
    _, [call] = parse_extra_networks("<lora:name:0.5:unet=0.25:dyn=8:a=b=c>")
    assert call.positional == ("name", "0.5", "a=b=c")
    assert call.named == {"unet": "0.25", "dyn": "8"}
    assert call.tag == "<lora:name:0.5:unet=0.25:dyn=8:a=b=c>"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<lora:foo>", LoraCall("foo", 1.0, 1.0, None)),
        ("<lora:foo:0.7>", LoraCall("foo", 0.7, 0.7, None)),
        ("<lora:foo:0.7:0.2>", LoraCall("foo", 0.7, 0.2, None)),
        ("<lora:foo:0.7:0.2:16>", LoraCall("foo", 0.7, 0.2, 16)),
        ("<lora:foo:te=0.3>", LoraCall("foo", 0.3, 0.3, None)),
        ("<lora:foo:unet=0.4>", LoraCall("foo", 1.0, 0.4, None)),
        ("<lora:foo:0.9:te=0.3:dyn=4>", LoraCall("foo", 0.3, 0.3, 4)),
        ("<lora:foo:-1.5>", LoraCall("foo", -1.5, -1.5, None)),
        ("<lyco:bar:0.5>", LoraCall("bar", 0.5, 0.5, None)),
        ("<lora:my lora v2.1:1>", LoraCall("my lora v2.1", 1.0, 1.0, None)),
    ],
)
def test_lora_calls(prompt: str, expected: LoraCall) -> None:
    _, calls = parse_extra_networks(prompt)
    assert lora_calls(calls) == [expected]


def test_default_multiplier_applies_when_no_weight_is_given() -> None:
    _, calls = parse_extra_networks("<lora:a> <lora:b:0.5>")
    assert lora_calls(calls, default_multiplier=0.8) == [LoraCall("a", 0.8, 0.8), LoraCall("b", 0.5, 0.5)]


def test_lora_order_groups_by_kind_first_seen_and_ignores_other_networks() -> None:
    _, calls = parse_extra_networks("<lora:a:1> <hypernet:h:1> <lyco:b:1> <lora:c:1>")
    assert [call.name for call in lora_calls(calls)] == ["a", "c", "b"]


@pytest.mark.parametrize("prompt", ["<lora:foo:strong>", "<lora:foo:1:x>", "<lora:foo:1:1:big>", "<lora:foo:inf>"])
def test_bad_numbers_raise_invalid_request_naming_the_field(prompt: str) -> None:
    _, calls = parse_extra_networks(prompt)
    with pytest.raises(InvalidRequest) as error:
        lora_calls(calls, field="hr_prompt")
    assert error.value.field == "hr_prompt"
    assert prompt in error.value.message


def test_missing_name_raises() -> None:
    _, calls = parse_extra_networks("<lora:te=1>")
    with pytest.raises(InvalidRequest):
        lora_calls(calls)


def test_batch_networks_come_from_the_first_prompt_only() -> None:
    texts, calls = parse_extra_networks_batch(["a <lora:x:1>", "b <lora:y:1>"])
    assert texts == ["a ", "b "]
    assert calls == [ExtraNetworkCall("lora", ("x", "1"))]
    assert parse_extra_networks_batch([]) == ([], [])
