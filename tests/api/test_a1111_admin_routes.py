"""Options, listings, refresh/unload/reload, server control, extras/png-info/interrogate, probing."""

import base64
from pathlib import Path
import io
import json

import pytest
from PIL import Image, PngImagePlugin

from sdserver.settings import Credential


def test_options_round_trip_the_whole_dict(client):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "alpha.safetensors [aaaaaaaaaa]"
    r = client.post("/sdapi/v1/options", json=options)
    assert r.status_code == 200 and r.json() is None
    assert client.get("/sdapi/v1/options").json() == options


def test_options_subset_is_stored_and_echoed(client):
    assert client.post("/sdapi/v1/options", json={"send_seed": False, "my_own_key": 3}).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert options["send_seed"] is False and options["my_own_key"] == 3


def test_read_only_options_are_ignored(client):
    client.post("/sdapi/v1/options", json={"sd_checkpoint_hash": "forged", "api_enable_requests": True})
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_checkpoint_hash"] == "a" * 64


def test_switching_the_model_goes_through_the_queue(client, engine_of):
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"})
    assert r.status_code == 200
    assert engine_of(client).loads[-1] == "beta.safetensors [bbbbbbbbbb]"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "beta.safetensors [bbbbbbbbbb]"
    body = client.post("/sdapi/v1/txt2img", json={"steps": 1}).json()
    assert json.loads(body["info"])["sd_model_name"] == "beta"


def test_unknown_checkpoint_is_an_error_naming_it_and_changes_nothing(client):
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors", "send_seed": False})
    assert r.status_code == 404
    assert "nope.safetensors" in r.json()["detail"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "alpha.safetensors [aaaaaaaaaa]" and options["send_seed"] is True


def test_invalid_option_value_is_a_422_naming_the_key(client):
    r = client.post("/sdapi/v1/options", json={"samples_format": "bmp"})
    assert r.status_code == 422 and r.json()["field"] == "samples_format"


def test_frozen_settings_refuse_post(make_client):
    client = make_client(freeze_settings=True)
    assert client.post("/sdapi/v1/options", json={"send_seed": False}).status_code == 403


def test_options_persist_to_config_json(client, tmp_path):
    client.post("/sdapi/v1/options", json={"send_seed": False})
    assert json.loads((tmp_path / "config.json").read_text())["send_seed"] is False


def test_cmd_flags_never_contain_the_password(make_client):
    client = make_client(api_auth=(Credential("alice", "s3cr3t-pw"),))
    r = client.get("/sdapi/v1/cmd-flags", auth=("alice", "s3cr3t-pw"))
    assert r.status_code == 200
    assert "s3cr3t-pw" not in r.text and "alice" not in r.text
    assert r.json()["api_auth"]


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("sd-models", {"title", "model_name", "hash", "sha256", "filename", "config"}),
        ("samplers", {"name", "aliases", "options"}),
        ("schedulers", {"name", "label", "aliases", "default_rho", "need_inner_model"}),
        ("upscalers", {"name", "model_name", "model_path", "model_url", "scale"}),
        ("latent-upscale-modes", {"name"}),
    ],
)
def test_listings_carry_a1111_item_shapes(client, path, keys):
    items = client.get(f"/sdapi/v1/{path}").json()
    assert items and all(set(item) == keys for item in items)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("hypernetworks", []),
        ("face-restorers", []),
        ("realesrgan-models", []),
        ("loras", []),
        ("extensions", []),
        ("prompt-styles", []),
        ("sd-vae", []),
        ("script-info", []),
        ("scripts", {"txt2img": [], "img2img": []}),
        ("embeddings", {"loaded": {}, "skipped": {}}),
    ],
)
def test_empty_listings(client, path, expected):
    assert client.get(f"/sdapi/v1/{path}").json() == expected


def test_sd_vae_lists_the_engines_vae_files(client):
    client.app.state.engine.vaes = [Path("/m/VAE/kl.safetensors")]
    assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": "kl.safetensors", "filename": "/m/VAE/kl.safetensors"}]


def test_prompt_styles_come_from_styles_csv(make_client, tmp_path):
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nnoir,{prompt} in black and white,color\n")
    client = make_client()
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "noir", "prompt": "{prompt} in black and white", "negative_prompt": "color"}
    ]


def test_memory_shape(client):
    memory = client.get("/sdapi/v1/memory").json()
    assert set(memory) == {"ram", "cuda"} and "total" in memory["ram"]


def test_refresh_unload_reload(client, engine_of):
    engine = engine_of(client)
    assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
    assert engine.refreshes == 1
    for path in ("refresh-vae", "refresh-embeddings", "refresh-loras"):
        r = client.post(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() is None
    assert client.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert engine.unloaded
    assert client.post("/sdapi/v1/reload-checkpoint").json() == {}
    assert not engine.unloaded


@pytest.mark.parametrize("path", ["create/embedding", "create/hypernetwork", "train/embedding", "train/hypernetwork"])
def test_create_and_train_say_unsupported_in_a1111_shape(client, path):
    r = client.post(f"/sdapi/v1/{path}", json={"name": "x"})
    assert r.status_code == 200 and "not supported" in r.json()["info"]


def test_server_control_routes_exist_only_with_the_flag(client, make_client, recorder):
    for path in ("server-stop", "server-kill", "server-restart"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 404
    enabled = make_client(api_server_stop=True)
    r = enabled.post("/sdapi/v1/server-stop")
    assert r.status_code == 200 and r.text == "Stopping."
    assert recorder.stops == 1
    assert enabled.post("/sdapi/v1/server-restart").status_code == 501
    assert enabled.post("/sdapi/v1/server-kill").status_code == 200
    assert recorder.kills == 1


def test_interrogate_has_no_model(client):
    r = client.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert r.status_code == 404 and r.json()["detail"] == "Model not found"


def test_extras_upscale_single_and_batch_images(client):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    single = client.post("/sdapi/v1/extra-single-image", json={"image": f"data:image/png;base64,{data}"}).json()
    assert Image.open(io.BytesIO(base64.b64decode(single["image"]))).size == (16, 12)
    batch = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": data, "name": "a"}] * 2}).json()
    assert len(batch["images"]) == 2


def test_extras_with_a_broken_image_is_a_422_naming_it(client):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": "not base64!"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": "xx", "name": "a"}]})
    assert r.status_code == 422 and "imageList[0]" in r.json()["detail"]


def test_png_info_reads_the_parameters_chunk(client):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=meta)
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert r.status_code == 200
    assert r.json()["info"].startswith("a cat") and r.json()["parameters"]["Seed"] == "5"


def test_png_info_of_nothing_is_empty(client):
    assert client.post("/sdapi/v1/png-info", json={"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}


def test_probing_absent_routes_and_wrong_methods(client):
    assert client.get("/sdapi/v1/txt2img").status_code == 405
    assert client.get("/sdapi/v1/img2img").status_code == 405
    assert client.get("/sdapi/v1/no-such-route").status_code == 404
    assert client.get("/controlnet/version").status_code == 404
    assert client.get("/sdapi/v1/txt2img").json() == {"detail": "Method Not Allowed"}


def test_docs_and_openapi_are_reachable(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/sdapi/v1/txt2img" in paths and "/sdserver/v1/jobs/{job_id}" in paths


def test_web_ui_is_served_and_does_not_shadow_the_api(client, make_client):
    r = client.get("/")
    assert r.status_code == 200 and 'api("txt2img")' in client.get("/ui/app.js").text
    assert "<form" in r.text
    assert make_client(webui=False).get("/").status_code == 404


def test_override_checkpoint_is_restored_afterwards_by_default(client, engine_of):
    body = {"steps": 1, "override_settings": {"sd_model_checkpoint": "beta"}}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "beta"
    assert engine_of(client).loaded.model_name == "alpha"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha.safetensors [aaaaaaaaaa]"


def test_override_checkpoint_sticks_without_restore(client, engine_of):
    body = {"steps": 1, "override_settings": {"sd_model_checkpoint": "beta"},
            "override_settings_restore_afterwards": False}
    client.post("/sdapi/v1/txt2img", json=body)
    assert engine_of(client).loaded.model_name == "beta"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "beta.safetensors [bbbbbbbbbb]"
