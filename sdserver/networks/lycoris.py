"""LyCORIS network types as A1111 computes them: LoHa, LoKr and full/diff.

Facts from A1111's `network_hada.py`, `network_lokr.py`, `network_full.py` and `lyco_helpers.py`:

- LoHa: `(w1_a @ w1_b) * (w2_a @ w2_b)` (Hadamard product), each factor optionally CP-decomposed with a core
  `t` (`einsum('i j k l, j r -> i r k l')` then `einsum('i j k l, i r -> r j k l')`); rank = `hada_w1_b`'s
  first size.
- LoKr: `kron(w1, w2)` where each of w1, w2 is stored whole or as `a @ b` (w2 also CP with `lokr_t2`); a conv
  w2 gets w1 broadcast over its kernel; rank = `lokr_w2_b`'s first size, else `lokr_w1_b`'s, else none
  (then alpha is not applied).
- full: `diff` is the delta itself, `diff_b` a bias delta; no alpha scale.

Every function returns the unscaled delta in its natural shape; tensors arrive as float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Parts = Mapping[str, torch.Tensor]

_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def cp_weight(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker/CP-decomposed conv weight: `core` [r, r, kh, kw], `wa` [r, out], `wb` [r, in] → [out, in, kh, kw]."""
    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def is_loha(parts: Parts) -> bool:
    return all(name in parts for name in _HADA)


def loha_rank(parts: Parts) -> int:
    return int(parts["hada_w1_b"].shape[0])


def _conventional(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def loha_delta(parts: Parts) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (parts[name] for name in _HADA)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if t1 is not None:
        first = cp_weight(t1, w1a, w1b)
    else:
        shape = [w1a.shape[0], w1b.shape[1], *w1b.shape[2:]]
        first = _conventional(w1a, w1b).reshape(shape)
    second = cp_weight(t2, w2a, w2b) if t2 is not None else _conventional(w2a, w2b)
    return first * second.reshape(first.shape)


def is_lokr(parts: Parts) -> bool:
    has_1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has_2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    return has_1 and has_2


def lokr_rank(parts: Parts) -> int | None:
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in parts:
            return int(parts[name].shape[0])
    return None


def lokr_delta(parts: Parts, shape: torch.Size) -> torch.Tensor:
    """kron(w1, w2) laid out as the target `shape` (a conv target takes its shape directly, like A1111)."""
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
    elif "lokr_t2" in parts:
        w2 = cp_weight(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    delta = torch.kron(w1, w2.contiguous())
    if len(shape) == 4:
        return delta.reshape(shape)
    return delta.reshape(w1.shape[0] * w2.shape[0], -1)


def is_full(parts: Parts) -> bool:
    return "diff" in parts


def full_delta(parts: Parts) -> torch.Tensor:
    return parts["diff"]
