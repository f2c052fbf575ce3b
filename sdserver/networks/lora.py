"""Plain LoRA (kohya, A1111, diffusers/PEFT), LoCon conv layers included: the weight delta `up @ down`.

Facts from A1111's `extensions-builtin/Lora/network_lora.py` and `lyco_helpers.py`: the rank (`dim`) is
`lora_down`'s first size; a `lora_mid` tensor is a CP-decomposed conv core (`einsum('n m k l, i n, m j ->
i j k l')`); a `dyn=N` prompt argument keeps only the first N ranks, while the alpha/dim scale still uses the
full rank. Tensors arrive as float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def is_lora(parts: Mapping[str, torch.Tensor]) -> bool:
    return UP in parts and DOWN in parts


def lora_rank(parts: Mapping[str, torch.Tensor]) -> int:
    return int(parts[DOWN].shape[0])


def lora_delta(parts: Mapping[str, torch.Tensor], dyn: int | None = None) -> torch.Tensor:
    """The unscaled delta in its natural shape: [out, in] for linear layers, [out, in, kh, kw] for convs."""
    up, down = parts[UP], parts[DOWN]
    up2 = up.reshape(up.shape[0], -1)
    down2 = down.reshape(down.shape[0], -1)
    if dyn is not None:
        up2, down2 = up2[:, :dyn], down2[:dyn]
    mid = parts.get(MID)
    if mid is not None:
        if dyn is not None:
            mid = mid[:dyn, :dyn]
        return torch.einsum("nmkl,in,mj->ijkl", mid, up2, down2)
    shape = [up.shape[0], down.shape[1], *down.shape[2:]]
    return (up2 @ down2).reshape(shape)
