import json
from dataclasses import dataclass
from pathlib import Path

from sdserver.api.a1111 import listings
from sdserver.api.a1111.styles import PromptStyle, parse_styles_csv, read_styles_csv
from sdserver.engine.types import CheckpointInfo


def test_sd_models_full_shape():
    info = CheckpointInfo(title="a.safetensors [0123456789]", model_name="sub_a", name="sub/a.safetensors",
                          filename="/m/sub/a.safetensors", hash="0123456789")
    assert listings.sd_models_listing([info]) == [{
        "title": "a.safetensors [0123456789]", "model_name": "sub_a", "hash": "0123456789", "sha256": None,
        "filename": "/m/sub/a.safetensors", "config": None}]


def test_small_listings():
    ups = listings.upscalers_listing()
    assert [u["name"] for u in ups] == ["None", "Lanczos", "Nearest"]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in ups)
    assert [m["name"] for m in listings.latent_upscale_modes()][0] == "Latent"
    assert len(listings.latent_upscale_modes()) == 6
    assert listings.scripts_listing() == {"txt2img": [], "img2img": []}
    assert listings.embeddings_listing() == {"loaded": {}, "skipped": {}}
    assert listings.script_info_listing() == []
    assert listings.sd_vae_listing([Path("/v/x.vae.pt")]) == [{"model_name": "x.vae.pt", "filename": "/v/x.vae.pt"}]


def test_memory_info_shape():
    mem = listings.memory_info()
    assert set(mem["ram"]) == {"free", "used", "total"} and mem["ram"]["used"] > 0
    assert "error" in mem["cuda"] or "system" in mem["cuda"]
    assert listings.memory_info(cuda={"error": "unavailable"})["cuda"] == {"error": "unavailable"}
    json.dumps(mem)


@dataclass(frozen=True)
class FakeSettings:
    api: bool = True
    port: int = 7860
    api_auth: str | None = "alice:s3cretpw,bob:hunter22"
    gradio_auth: str | None = None
    api_auth_file: Path | None = Path("/etc/auth.txt")
    hf_token: str = "hf_abcdef"
    ckpt_dir: Path = Path("/models")
    argv: tuple[str, ...] = ("--api", "--api-auth", "alice:s3cretpw,bob:hunter22", "--port", "7860")
    note: str = "logged in as bob:hunter22"
    no_auth_warning: bool = False


def test_cmd_flags_never_echoes_credentials():
    flags = listings.cmd_flags(FakeSettings())
    text = json.dumps(flags)
    for secret in ("s3cretpw", "hunter22", "hf_abcdef", "alice:", "/etc/auth.txt"):
        assert secret not in text
    assert flags["api_auth"] == "***" and flags["gradio_auth"] is None and flags["hf_token"] == "***"
    assert flags["no_auth_warning"] is False
    assert flags["port"] == 7860 and flags["api"] is True and flags["ckpt_dir"] == "/models"
    assert flags["argv"][:2] == ["--api", "--api-auth"] and flags["argv"][2] == "***"


def test_cmd_flags_from_a_mapping():
    flags = listings.cmd_flags({"listen": True, "api_auth": None, "tls_keyfile": "/k.pem"})
    assert flags == {"listen": True, "api_auth": None, "tls_keyfile": "***"}


def test_styles_csv(tmp_path):
    text = '\ufeffname,prompt,negative_prompt\n"wrap","best, {prompt}","bad"\nplain,oil painting,\n,skipped,\n'
    styles = parse_styles_csv(text)
    assert list(styles) == ["wrap", "plain"]
    assert styles["wrap"] == PromptStyle("wrap", "best, {prompt}", "bad")
    assert listings.prompt_styles_listing(styles)[1] == {"name": "plain", "prompt": "oil painting",
                                                         "negative_prompt": ""}
    assert read_styles_csv(tmp_path / "missing.csv") == {}
    (tmp_path / "styles.csv").write_text(text, encoding="utf-8")
    assert read_styles_csv(tmp_path / "styles.csv") == styles
