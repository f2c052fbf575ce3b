"""Unloading a checkpoint gives its memory back to the OS, measured as resident set size in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig
from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs

# Runs in a subprocess so the numbers are this load's alone. A tiny checkpoint is loaded and unloaded first,
# as a server has done some work before: imports, the tokenizer and the allocator's arenas are in place.
_MEASURE = r"""
import json, os, sys
from pathlib import Path
import torch
from sdserver.models.manager import ModelManager

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

root = Path(sys.argv[1])
dtype = getattr(torch, sys.argv[2])
manager = ModelManager([root], None, root / "cache.json", torch.device("cpu"), dtype, hashing=False)
manager.load("warm")
manager.unload()
before = rss()
model = manager.load("big")
# Read every weight, as the first generation does: weights may be mapped from the file and paged in lazily.
weights = list(model.state_dict().values())
touched = [float(t.float().sum()) for t in weights]
size = sum(t.numel() * t.element_size() for t in weights)
del weights
loaded = rss()
del model
manager.unload()
after = rss()
print(json.dumps({"before": before, "loaded": loaded, "after": after, "weights": size}))
"""


def _big_configs() -> tuple[UNetConfig, object, TextEncoderConfig]:
    """About 210 MB of fp32 weights: large enough that a leak shows, small enough for a test."""
    unet = UNetConfig(model_channels=96, channel_mult=(1, 2, 4), num_res_blocks=1, transformer_depth=(1, 1, 2),
                      context_dim=128)
    text = TextEncoderConfig(width=128, layers=2, heads=2, intermediate=256)
    return unet, tiny_sd1_configs()[1], text


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unload")
    save_checkpoint(random_sd1_state_dict(*tiny_sd1_configs(), seed=0), root / "warm.safetensors")
    save_checkpoint(random_sd1_state_dict(*_big_configs(), seed=0), root / "big.safetensors")
    return root


# float32: the weights are the file's tensors; bfloat16: converted copies on the heap, which glibc keeps
# unless trimmed.
@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="resident memory is read from /proc (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unload_returns_resident_memory_to_the_level_before_load(folder: Path, dtype: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), dtype], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20, 1) for k, v in numbers.items()}
    print(f"{dtype} RSS MiB: before load {mb['before']}, loaded {mb['loaded']}, after unload {mb['after']}; "
          f"weights {mb['weights']}")
    # The measurement sees the model, or the comparison below would prove nothing.
    assert numbers["loaded"] - numbers["before"] >= 0.8 * numbers["weights"]
    assert numbers["after"] <= 1.10 * numbers["before"], mb
