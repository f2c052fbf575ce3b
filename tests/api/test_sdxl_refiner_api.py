"""The refiner and SDXL inpainting over HTTP: A1111 bodies through the app, the queue and a real engine on tiny
SDXL base, refiner and inpainting checkpoints."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.app import create_app
from sdserver.engine.engine import Libraries, LocalEngine
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import random_state_dict, save_checkpoint, tiny_sdxl_configs, tiny_sdxl_refiner_configs
from sdserver.networks import EmbeddingDatabase, NetworkLibrary
from sdserver.settings import Settings
from sdserver.upscalers.registry import UpscalerRegistry


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api-refiner") / "Stable-diffusion"
    save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(), seed=1), folder / "base.safetensors")
    save_checkpoint(random_state_dict("sdxl_refiner", tiny_sdxl_refiner_configs(), seed=2),
                    folder / "xl_refiner.safetensors")
    save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(inpainting=True), seed=3),
                    folder / "xl_inpaint.safetensors")
    return folder


@pytest.fixture
def client(ckpt_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    manager = ModelManager([ckpt_dir], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32)
    libraries = Libraries(UpscalerRegistry({}), NetworkLibrary([tmp_path / "Lora"]),
                          EmbeddingDatabase([tmp_path / "embeddings"]))
    manager.load("base")
    app = create_app(Settings(data_dir=tmp_path, shutdown_grace=1.0), engine=LocalEngine(manager, libraries))
    with TestClient(app) as test_client:
        yield test_client


BODY = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 7, "steps": 5, "width": 64, "height": 64,
        "sampler_name": "Euler"}


def _png(color: tuple[int, int, int] | int, mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_with_a_refiner_writes_a1111s_infotext(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "xl_refiner", "refiner_switch_at": 0.8})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    short = client.get("/sdapi/v1/sd-models").json()
    refiner_hash = next(m["hash"] for m in short if m["model_name"] == "xl_refiner")
    assert refiner_hash and f"Refiner: xl_refiner [{refiner_hash}], Refiner switch at: 0.8" in info["infotexts"][0]
    assert info["extra_generation_params"]["Refiner"] == f"xl_refiner [{refiner_hash}]"
    assert info["sd_model_name"] == "base"
    # The base is the loaded model again.
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("base.safetensors")


def test_unknown_refiner_is_a_422_naming_the_field(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "nope.safetensors"})
    assert r.status_code == 422 and r.json()["field"] == "refiner_checkpoint"
    assert "nope.safetensors" in r.json()["detail"]


def test_sdxl_inpainting_over_img2img_with_the_refiner(client: TestClient) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = {**BODY, "init_images": [_png((30, 160, 60))], "mask": base64.b64encode(buffer.getvalue()).decode(),
            "denoising_strength": 0.75, "inpainting_fill": 1, "refiner_checkpoint": "xl_refiner",
            "refiner_switch_at": 0.5, "override_settings": {"sd_model_checkpoint": "xl_inpaint"}}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["is_using_inpainting_conditioning"] is True and info["sd_model_name"] == "xl_inpaint"
    assert "Refiner: xl_refiner" in info["infotexts"][0] and "Conditional mask weight: 1.0" in info["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (64, 64) and image.convert("RGB").getpixel((1, 1)) == (30, 160, 60)


def test_hires_fix_with_the_refiner_in_the_second_pass(client: TestClient) -> None:
    body = {**BODY, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 3,
            "denoising_strength": 0.5, "refiner_checkpoint": "xl_refiner", "refiner_switch_at": 0.5}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Refiner: xl_refiner" in info["infotexts"][0] and "Hires refiner" not in info["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (96, 96)
