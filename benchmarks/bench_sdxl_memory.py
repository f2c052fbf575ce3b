"""Peak memory and time per phase of one full-size SDXL generation on the CPU, from a random checkpoint.

    python benchmarks/bench_sdxl_memory.py [--threads 1] [--size 1024] [--dtype default|fp32|bf16|fp16]

Writes a random checkpoint of the released SDXL base shapes (fp16, the original single-file key layout, about
6.9 GB) into a temporary folder, streamed tensor by tensor so building it holds one tensor at a time; loads it
through ModelManager (the server's loader: validate shapes, read, build); runs one txt2img step (Euler, CFG 7,
batch 1) and the VAE decode at `--size`; deletes the file. After each phase it prints the seconds taken, the
resident memory now (VmRSS) and the peak so far (VmHWM), from /proc/self/status. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path

import torch

from sdserver.engine.devices import cpu_has_native_bf16, pick_dtype
from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import family_shapes, sdxl_configs
from sdserver.pipeline.txt2img import txt2img

GIB = 1024**3
_WEIGHT_STD = 0.02  # small random weights keep fp16/bf16 activations finite through the 70-layer UNet
_ALIGN = 8  # safetensors pads its JSON header so tensor data starts 8-byte aligned


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux)."""
    values: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def write_random_safetensors(shapes: dict[str, tuple[int, ...]], path: Path, seed: int = 0) -> int:
    """A random fp16 `.safetensors` of these shapes, written one tensor at a time; returns its size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    keys = sorted(shapes)
    for key in keys:
        size = 2 * int(torch.Size(shapes[key]).numel())
        header[key] = {"dtype": "F16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    generator = torch.Generator().manual_seed(seed)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for key in keys:
            tensor = torch.randn(shapes[key], generator=generator, dtype=torch.float32).mul_(_WEIGHT_STD)
            out.write(tensor.to(torch.float16).numpy().tobytes())
    return path.stat().st_size


class PhaseClock:
    """Times phases and prints memory after each one."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.rows: list[tuple[str, float, int, int]] = []

    def mark(self, phase: str, at: float | None = None) -> None:
        now = at if at is not None else time.perf_counter()
        mem = memory_status()
        self.rows.append((phase, now - self.last, mem.get("VmRSS", 0), mem.get("VmHWM", 0)))
        print(f"{phase:44s} {now - self.last:8.1f} s   RSS {mem.get('VmRSS', 0) / GIB:6.2f} GiB   "
              f"peak {mem.get('VmHWM', 0) / GIB:6.2f} GiB", flush=True)
        self.last = now


class StepClock:
    """A JobControl that notes when the first sampler step finishes."""

    def __init__(self) -> None:
        self.step_done: float | None = None

    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None: ...

    def step(self, step: int, preview) -> None:  # type: ignore[no-untyped-def]
        self.step_done = time.perf_counter()

    def wants_preview(self, step: int) -> bool:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("default", "fp32", "bf16", "fp16"), default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {
        "default": pick_dtype(torch.device("cpu"), "autocast", False, cpu_has_native_bf16()),
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    }[args.dtype]
    print(f"SDXL base shapes, fp16 file, compute {str(dtype).removeprefix('torch.')}, {args.size}x{args.size}, "
          f"Euler 1 step, CFG 7, {args.threads} threads", flush=True)
    clock = PhaseClock()
    with tempfile.TemporaryDirectory(prefix="bench-sdxl-") as tmp:
        folder = Path(tmp) / "Stable-diffusion"
        folder.mkdir()
        size = write_random_safetensors(family_shapes("sdxl", sdxl_configs()), folder / "sdxl-random.safetensors")
        clock.mark(f"write random checkpoint ({size / GIB:.2f} GiB)")

        manager = ModelManager([folder], None, Path(tmp) / "cache.json", torch.device("cpu"), dtype, hashing=False)
        model = manager.load("sdxl-random")
        if dtype == torch.bfloat16:
            model.unet.to(memory_format=torch.channels_last)  # as the engine runs bf16 on the CPU
        clock.mark("load (validate, read, build)")

        unet_time = [0.0]
        started: list[float] = []
        model.unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        model.unet.register_forward_hook(lambda *_: unet_time.__setitem__(0, unet_time[0] + time.perf_counter() - started[-1]))
        request = GenerationRequest(
            prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", width=args.size,
            height=args.size, sampling=SamplingParams(sampler="euler", steps=1, cfg_scale=7.0),
            seeds=SeedParams(seed=1),
        )
        control = StepClock()
        images, _ = txt2img(model, request, control)
        assert control.step_done is not None and images[0].image.size == (args.size, args.size)
        step_start = clock.last
        clock.mark("text encoding + noise + 1 Euler step (CFG)", at=control.step_done)
        print(f"{'  of which the UNet (cond+uncond batch)':44s} {unet_time[0]:8.1f} s", flush=True)
        clock.mark("VAE decode + image")
        print(f"{'generation total':44s} {clock.last - step_start:8.1f} s", flush=True)
    peak = max(row[3] for row in clock.rows)
    print(f"peak resident memory (VmHWM): {peak / GIB:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
