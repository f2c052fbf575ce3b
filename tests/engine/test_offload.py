"""--medvram / --lowvram: which part of the model is on the compute device when, recorded on the CPU.

The compute device is `cpu:0` and storage `cpu` (the same memory, so the tiny model runs anyway); a recording
mover stands in for the transfers and says which unit went where."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sdserver.engine.engine import create_engine
from sdserver.engine.offload import LOWVRAM, MEDVRAM, MEDVRAM_SDXL, NONE, Offload, offload_mode, plan
from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.models.manager import load_checkpoint
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.pipeline.images import decode_latents
from sdserver.pipeline.txt2img import txt2img
from sdserver.settings import Settings

COMPUTE = torch.device("cpu", 0)
STORAGE = torch.device("cpu")


@dataclass
class Recorder:
    """Records (unit name, "in"/"out") per move, collapsing the modules of one unit moved together."""

    names: dict[int, str] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)

    def learn(self, model, mode: str) -> None:  # type: ignore[no-untyped-def]
        anchors, units = plan(model, mode)
        for module in anchors:
            self.names[id(module)] = "anchor"
        for unit in units:
            for module in unit.modules:
                self.names[id(module)] = unit.name

    def __call__(self, module: nn.Module, device: torch.device) -> None:
        event = (self.names.get(id(module), type(module).__name__), "in" if device == COMPUTE else "out")
        if not self.events or self.events[-1] != event:
            self.events.append(event)

    def take(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


@pytest.fixture()
def model(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    return load_checkpoint(tiny_checkpoint, torch.float32, "cpu")


def request(steps: int = 2) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red circle", negative_prompt="blue", width=64, height=64,
        sampling=SamplingParams(sampler="euler", scheduler="automatic", steps=steps, cfg_scale=5.0),
        seeds=SeedParams(seed=11),
    )


def installed(model, mode: str) -> tuple[Offload, Recorder]:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    recorder.learn(model, mode)
    offload = Offload(mode, COMPUTE, storage=STORAGE, move=recorder)
    offload.prepare(model)
    return offload, recorder


def test_flags_pick_the_mode_and_do_nothing_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cuda = torch.device("cuda")
    assert offload_mode(cuda) == NONE
    assert offload_mode(cuda, medvram=True) == MEDVRAM
    assert offload_mode(cuda, medvram=True, lowvram=True) == LOWVRAM
    assert offload_mode(cuda, medvram_sdxl=True) == MEDVRAM_SDXL
    with caplog.at_level(logging.INFO, logger="sdserver.engine.offload"):
        assert offload_mode(torch.device("cpu"), lowvram=True) == NONE
        assert offload_mode(torch.device("cpu")) == NONE
    assert len(caplog.records) == 1 and "--lowvram" in caplog.records[0].getMessage()
    assert Offload(NONE, torch.device("cpu")).storage_device == torch.device("cpu")
    assert Offload(MEDVRAM, cuda).storage_device == torch.device("cpu")


def test_medvram_keeps_one_part_on_the_device_at_a_time(model, control) -> None:  # type: ignore[no-untyped-def]
    offload, recorder = installed(model, MEDVRAM)
    assert recorder.take() == [("anchor", "in"), ("text_encoder.0", "out"), ("unet", "out"), ("vae", "out")]
    txt2img(model, request(), control)
    assert recorder.take() == [
        ("text_encoder.0", "in"),
        ("text_encoder.0", "out"), ("unet", "in"),
        ("unet", "out"), ("vae", "in"),
    ]
    txt2img(model, request(), control)
    assert recorder.take() == [
        ("vae", "out"), ("text_encoder.0", "in"),
        ("text_encoder.0", "out"), ("unet", "in"),
        ("unet", "out"), ("vae", "in"),
    ]
    offload.prepare(model)  # the same model again: nothing moves
    assert recorder.take() == []


def test_lowvram_moves_the_unet_blocks_one_at_a_time_in_order(model, control) -> None:  # type: ignore[no-untyped-def]
    _, recorder = installed(model, LOWVRAM)
    recorder.take()
    txt2img(model, request(steps=2), control)
    events = recorder.take()
    on_device: set[str] = set()
    for name, where in events:
        (on_device.add if where == "in" else on_device.discard)(name)
        assert len(on_device) <= 1, events
    unet = model.unet
    blocks = [f"unet.input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["unet.middle_block"]
    blocks += [f"unet.output_blocks.{i}" for i in range(len(unet.output_blocks))]
    arrivals = [name for name, where in events if where == "in"]
    assert arrivals[0] == "text_encoder.0" and arrivals[-1] == "vae"
    calls = (len(arrivals) - 2) // len(blocks)
    assert calls >= 2 and arrivals[1:-1] == blocks * calls


@pytest.mark.parametrize("mode", [MEDVRAM, LOWVRAM])
def test_offloaded_runs_make_the_same_pixels(model, tiny_checkpoint: Path, control, mode: str) -> None:  # type: ignore[no-untyped-def]
    plain = load_checkpoint(tiny_checkpoint, torch.float32, "cpu")
    want = np.asarray(txt2img(plain, request(), control)[0][0].image)
    Offload(mode, COMPUTE, storage=STORAGE).prepare(model)  # real `.to` moves between cpu and cpu:0
    got = np.asarray(txt2img(model, request(), control)[0][0].image)
    assert np.array_equal(got, want)


def test_preparing_another_model_parks_the_first(model, tiny_checkpoint: Path, control) -> None:  # type: ignore[no-untyped-def]
    other = load_checkpoint(tiny_checkpoint, torch.float32, "cpu")
    recorder = Recorder()
    recorder.learn(model, MEDVRAM)
    offload = Offload(MEDVRAM, COMPUTE, storage=STORAGE, move=recorder)
    offload.prepare(model)
    txt2img(model, request(), control)
    recorder.take()
    offload.prepare(other)
    assert recorder.take()[0] == ("vae", "out")  # the first model's VAE, last used, leaves before anything else


def test_a_new_vae_gets_the_hooks_and_the_old_one_loses_them(model) -> None:  # type: ignore[no-untyped-def]
    offload, recorder = installed(model, MEDVRAM)
    old = model.vae
    new = AutoencoderKL(model.spec.vae)
    model.vae = new
    offload.prepare(model)
    recorder.learn(model, MEDVRAM)
    recorder.take()
    latent = torch.zeros(1, 4, 2, 2)
    decode_latents(model, latent)
    assert recorder.take() == [("vae", "in")]
    with torch.no_grad():
        old.decode(latent)
    assert recorder.take() == []


def test_medvram_sdxl_leaves_other_families_whole_on_the_device(model) -> None:  # type: ignore[no-untyped-def]
    moved: list[nn.Module] = []
    Offload(MEDVRAM_SDXL, COMPUTE, storage=STORAGE, move=lambda m, d: moved.append(m)).prepare(model)
    assert moved == [model]
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_the_engine_accepts_the_flags_on_the_cpu(tiny_checkpoint: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, ckpt=tiny_checkpoint, lowvram=True, medvram=True, use_cpu=("all",),
                        precision="full")
    engine = create_engine(settings)
    assert engine.manager.storage_device == torch.device("cpu")
    model = engine.manager.current
    assert model is not None and all(not m._forward_pre_hooks for m in model.modules())
    assert engine.generate(request(steps=1), control).images
