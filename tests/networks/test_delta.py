"""Network-type math, checked against independent formulations: a LoCon delta must act like running its
down/mid/up convolutions in sequence; LoHa is an elementwise product; LoKr a Kronecker block structure."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sdserver.networks.delta import ShapeMismatch, fit, module_delta, network_type, unsupported_kind


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def delta_of(parts: dict[str, torch.Tensor], shape: tuple[int, ...], dyn: int | None = None) -> torch.Tensor:
    kind = network_type(parts)
    assert kind is not None
    weight, _ = module_delta(kind, parts, torch.Size(shape), dyn)
    return weight


def test_linear_lora_is_up_at_down_times_alpha_over_rank() -> None:
    up, down = rand(6, 2, seed=1), rand(2, 5, seed=2)
    delta = delta_of({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}, (6, 5))
    assert torch.allclose(delta, up @ down * 0.5)


def test_lora_without_alpha_is_unscaled_and_scale_overrides() -> None:
    up, down = rand(6, 4, seed=1), rand(4, 5, seed=2)
    assert torch.allclose(delta_of({"lora_up.weight": up, "lora_down.weight": down}, (6, 5)), up @ down)
    parts = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0), "scale": torch.tensor(3.0)}
    assert torch.allclose(delta_of(parts, (6, 5)), up @ down * 3.0)


def test_dyn_keeps_the_first_ranks_but_scales_by_the_full_rank() -> None:
    up, down = rand(6, 4, seed=1), rand(4, 5, seed=2)
    parts = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}
    assert torch.allclose(delta_of(parts, (6, 5), dyn=2), up[:, :2] @ down[:2] * 0.5)


def test_locon_3x3_acts_like_its_two_convolutions() -> None:
    down, up = rand(3, 4, 3, 3, seed=1), rand(5, 3, 1, 1, seed=2)
    delta = delta_of({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}, (5, 4, 3, 3))
    x = rand(1, 4, 7, 7, seed=3)
    sequential = F.conv2d(F.conv2d(x, down, padding=1), up)
    assert torch.allclose(F.conv2d(x, delta, padding=1), sequential, atol=1e-5)


def test_locon_with_a_cp_mid_acts_like_three_convolutions() -> None:
    down, mid, up = rand(3, 4, 1, 1, seed=1), rand(3, 3, 3, 3, seed=2), rand(5, 3, 1, 1, seed=3)
    parts = {"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid, "alpha": torch.tensor(1.5)}
    delta = delta_of(parts, (5, 4, 3, 3))
    x = rand(1, 4, 6, 6, seed=4)
    sequential = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5
    assert torch.allclose(F.conv2d(x, delta, padding=1), sequential, atol=1e-5)


def test_loha_is_the_hadamard_product_of_two_low_rank_products() -> None:
    w1a, w1b, w2a, w2b = rand(6, 2, seed=1), rand(2, 5, seed=2), rand(6, 2, seed=3), rand(2, 5, seed=4)
    parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.0)}
    assert torch.allclose(delta_of(parts, (6, 5)), (w1a @ w1b) * (w2a @ w2b) * 0.5)


def test_loha_conv_flattened_and_cp_forms() -> None:
    w1a, w1b, w2a, w2b = rand(6, 2, seed=1), rand(2, 4 * 9, seed=2), rand(6, 2, seed=3), rand(2, 4 * 9, seed=4)
    parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    expected = ((w1a @ w1b) * (w2a @ w2b)).reshape(6, 4, 3, 3)
    assert torch.allclose(delta_of(parts, (6, 4, 3, 3)), expected)
    # CP: t [r, r, k, k], a [r, out], b [r, in]; W[o, i] = sum_{p,q} t[p, q] a[p, o] b[q, i].
    t1, a1, b1 = rand(2, 2, 3, 3, seed=5), rand(2, 6, seed=6), rand(2, 4, seed=7)
    t2, a2, b2 = rand(2, 2, 3, 3, seed=8), rand(2, 6, seed=9), rand(2, 4, seed=10)

    def cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(6, 4, 3, 3)
        for p in range(2):
            for q in range(2):
                out += a[p][:, None, None, None] * b[q][None, :, None, None] * t[p, q]
        return out

    parts = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "hada_t1": t1, "hada_t2": t2}
    assert torch.allclose(delta_of(parts, (6, 4, 3, 3)), cp(t1, a1, b1) * cp(t2, a2, b2), atol=1e-5)


def test_lokr_is_a_kronecker_block_matrix() -> None:
    w1, w2a, w2b = rand(2, 3, seed=1), rand(4, 2, seed=2), rand(2, 5, seed=3)
    parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(4.0)}
    delta = delta_of(parts, (8, 15))
    w2 = w2a @ w2b
    for i in range(2):
        for j in range(3):
            assert torch.allclose(delta[4 * i : 4 * i + 4, 5 * j : 5 * j + 5], w1[i, j] * w2 * 2.0)


def test_lokr_with_whole_factors_ignores_alpha_and_handles_conv() -> None:
    w1, w2 = rand(2, 2, seed=1), rand(3, 2, 3, 3, seed=2)
    delta = delta_of({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(8.0)}, (6, 4, 3, 3))
    for i in range(2):
        for j in range(2):
            assert torch.allclose(delta[3 * i : 3 * i + 3, 2 * j : 2 * j + 2], w1[i, j] * w2)


def test_full_diff_and_bias() -> None:
    diff, diff_b = rand(6, 5, seed=1), rand(6, seed=2)
    kind = network_type({"diff": diff, "diff_b": diff_b})
    assert kind is not None and kind.name == "full"
    weight, bias = module_delta(kind, {"diff": diff, "diff_b": diff_b}, torch.Size((6, 5)))
    assert torch.equal(weight, diff) and torch.equal(bias, diff_b)


def test_inpainting_conv_in_gets_zero_padded_input_channels() -> None:
    delta = rand(5, 4, 3, 3, seed=1)
    padded = fit(delta, torch.Size((5, 9, 3, 3)))
    assert torch.equal(padded[:, :4], delta) and torch.equal(padded[:, 4:], torch.zeros(5, 5, 3, 3))
    with pytest.raises(ShapeMismatch):
        fit(delta, torch.Size((5, 8)))


def test_unsupported_types_are_named() -> None:
    assert unsupported_kind({"lora_up.weight": torch.zeros(1), "lora_down.weight": torch.zeros(1), "dora_scale": torch.zeros(1)}) == "DoRA"
    assert unsupported_kind({"weight": torch.zeros(1), "on_input": torch.zeros(1)}) == "IA3"
    assert network_type({"oft_blocks": torch.zeros(1)}) is None
