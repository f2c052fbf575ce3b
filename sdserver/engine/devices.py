"""Device and precision choice from A1111's flags."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX512-BF16 or AMX make bf16 matmuls native; elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(use_cpu: tuple[str, ...], device_id: str | None) -> torch.device:
    """`--use-cpu all` (or `sd`) keeps everything on the CPU, as A1111; else CUDA when present."""
    if {"all", "sd"} & {u.lower() for u in use_cpu} or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(device_id)}" if device_id not in (None, "") else "cuda")


def pick_dtype(device: torch.device, precision: str, no_half: bool, native_bf16: bool) -> torch.dtype:
    """fp32 with `--precision full` or `--no-half`; fp16 on CUDA; bf16 on CPUs that have it natively."""
    if precision == "full" or no_half:
        return torch.float32
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bf16 else torch.float32
