"""Conditioning helpers the refiner uses: mapping every scheduled entry, and sgm's zeroed embeddings."""

import torch

from sdserver.pipeline.conditioning import (
    PromptConditioning, ScheduledConditioning, TextConditioning, map_text_conditioning, zeroed,
)


def _entry(value: float, pooled: bool = True) -> TextConditioning:
    return TextConditioning(torch.full((77, 4), value), torch.full((3,), value) if pooled else None)


def test_map_keeps_schedules_and_weights() -> None:
    prompt = PromptConditioning((
        ScheduledConditioning(((3, _entry(1.0)), (10, _entry(2.0))), weight=0.5),
        ScheduledConditioning(((10, _entry(4.0)),), weight=1.5),
    ))
    doubled = map_text_conditioning(prompt, lambda e: TextConditioning(e.context * 2, e.pooled))
    assert [p.weight for p in doubled.parts] == [0.5, 1.5]
    assert [end for end, _ in doubled.parts[0].entries] == [3, 10]
    assert float(doubled.parts[0].at(5).context[0, 0]) == 4.0 and float(doubled.parts[1].at(0).context[0, 0]) == 8.0
    assert float(prompt.parts[0].at(5).context[0, 0]) == 2.0  # the input is left alone


def test_zeroed_embeddings_keep_their_shapes() -> None:
    out = zeroed(_entry(3.0))
    assert out.context.shape == (77, 4) and not out.context.any()
    assert out.pooled is not None and out.pooled.shape == (3,) and not out.pooled.any()
    assert zeroed(_entry(3.0, pooled=False)).pooled is None
