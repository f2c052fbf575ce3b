"""Server settings: one frozen value built from the command line (see sdserver.cli) or in code by tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Credential:
    """One `user:password` pair for HTTP Basic auth. repr hides the password so logs never show it."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Limits:
    """Request limits (each a documented flag). They keep one request from exhausting the machine."""

    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 4096  # width*height of one image
    max_steps: int = 150  # A1111's UI slider maximum
    max_batch: int = 64  # batch_size * n_iter
    max_body_bytes: int = 64 * 1024 * 1024  # a few 4K PNGs as base64, with room to spare
    max_image_pixels: int = 8192 * 8192  # decoded input images: stops decompression bombs before they expand
    max_prompt_chars: int = 32768


@dataclass(frozen=True)
class Settings:
    # --- serving
    host: str = "127.0.0.1"
    port: int = 7860
    webui: bool = True  # False with --nowebui: API only, as A1111
    subpath: str = ""  # reverse-proxy root path, "" or "/something"
    tls_keyfile: str | None = None
    tls_certfile: str | None = None
    timeout_keep_alive: int = 30
    api_log: bool = False
    api_server_stop: bool = False
    shutdown_grace: float = 10.0  # seconds a running job may finish in after SIGTERM before it is interrupted
    # --- auth and CORS
    api_auth: tuple[Credential, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    cors_allow_origins_regex: str | None = None
    # --- locations (None: A1111's layout under data_dir / models_dir)
    data_dir: Path = field(default_factory=Path.cwd)
    models_dir: Path | None = None
    ckpt_dir: Path | None = None
    ckpt: Path | None = None
    vae_dir: Path | None = None
    vae_path: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    hypernetwork_dir: Path | None = None
    esrgan_models_path: Path | None = None
    # --- device and precision
    device_id: str | None = None
    use_cpu: tuple[str, ...] = ()
    precision: str = "autocast"
    no_half: bool = False
    no_half_vae: bool = False
    # Sequential offload on CUDA (A1111's flags): parts of the model on the GPU only while they run.
    medvram: bool = False
    medvram_sdxl: bool = False  # medvram for SDXL models only
    lowvram: bool = False
    # --- behaviour
    skip_load_model_at_start: bool = False
    no_hashing: bool = False
    freeze_settings: bool = False
    queue_size: int = 64
    job_ttl: float = 3600.0
    cancel_on_disconnect: bool = False
    api_allow_remote_images: bool = False
    limits: Limits = field(default_factory=Limits)
    # Every command-line destination with its value, credentials redacted: what /cmd-flags shows.
    cmd_flags: tuple[tuple[str, Any], ...] = ()

    # A1111's folder layout; each flag overrides one folder.
    @property
    def models_root(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def checkpoint_dir(self) -> Path:
        return self.ckpt_dir or self.models_root / "Stable-diffusion"

    @property
    def vae_folder(self) -> Path:
        return self.vae_dir or self.models_root / "VAE"

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir or self.models_root / "Lora"

    @property
    def embeddings_folder(self) -> Path:
        return self.embeddings_dir or self.data_dir / "embeddings"

    @property
    def hypernetwork_folder(self) -> Path:
        return self.hypernetwork_dir or self.models_root / "hypernetworks"

    @property
    def esrgan_folder(self) -> Path:
        return self.esrgan_models_path or self.models_root / "ESRGAN"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def config_file(self) -> Path:
        """Where POSTed options persist, as A1111's config.json."""
        return self.data_dir / "config.json"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_auth)

    @property
    def half_precision(self) -> bool:
        """False when fp32 was forced (--precision full or --no-half)."""
        return not (self.no_half or self.precision == "full")

    def flags(self) -> dict[str, Any]:
        """The /cmd-flags view: the parsed command line, or the settings themselves; never a credential."""
        if self.cmd_flags:
            values = dict(self.cmd_flags)
        else:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cmd_flags"}
            values["limits"] = dataclasses.asdict(self.limits)
        for key in ("api_auth", "gradio_auth"):
            if values.get(key):
                values[key] = "<redacted>"
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
