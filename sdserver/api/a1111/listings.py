"""A1111 listing shapes (`/sd-models`, `/upscalers`, `/memory`, `/cmd-flags`, ...) built from internal data.

Every item carries A1111's full key set even where a value is null: clients index the keys directly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import PurePath
from typing import Any, Iterable, Mapping

import psutil

from sdserver.api.a1111.names import samplers_listing, schedulers_listing
from sdserver.api.a1111.styles import PromptStyle
from sdserver.engine.types import CheckpointInfo

__all__ = [
    "LATENT_UPSCALE_MODES",
    "cmd_flags",
    "cuda_memory",
    "embeddings_listing",
    "latent_upscale_modes",
    "memory_info",
    "prompt_styles_listing",
    "samplers_listing",
    "schedulers_listing",
    "script_info_listing",
    "scripts_listing",
    "sd_models_listing",
    "sd_vae_listing",
    "upscalers_listing",
]

LATENT_UPSCALE_MODES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
# The upscalers A1111 always has, needing no model file.
_BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")

# A setting whose name holds one of these is a credential (api_auth, gradio_auth, *_password, hf_token, ...).
SECRET_MARKERS = ("auth", "password", "passwd", "token", "secret", "key", "credential")
REDACTED = "***"


def sd_models_listing(checkpoints: Iterable[CheckpointInfo]) -> list[dict[str, Any]]:
    return [
        {
            "title": c.title,
            "model_name": c.model_name,
            "hash": c.hash,
            "sha256": c.sha256,
            "filename": c.filename,
            "config": c.config,
        }
        for c in checkpoints
    ]


def sd_vae_listing(files: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """`model_name` is the file name, `filename` the absolute path (A1111's /sd-vae)."""
    return [{"model_name": PurePath(f).name, "filename": os.fspath(f)} for f in files]


def upscalers_listing() -> list[dict[str, Any]]:
    # A1111 gives the built-in ones its UpscalerData default scale of 4.
    return [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in _BUILTIN_UPSCALERS
    ]


def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def prompt_styles_listing(styles: Mapping[str, PromptStyle]) -> list[dict[str, Any]]:
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]


def scripts_listing() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


def script_info_listing() -> list[dict[str, Any]]:
    return []


def embeddings_listing() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


def cuda_memory() -> dict[str, Any]:
    """A1111's `/memory` `cuda` block, or `{"error": "unavailable"}` without a CUDA device."""
    try:
        import torch  # noqa: PLC0415 - only this route needs it, and only when asked

        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
    except Exception as exc:  # noqa: BLE001 - the memory report must never fail the route
        return {"error": f"unavailable: {exc}"}

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def memory_info(cuda: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`{ram: {free, used, total}, cuda: {...}}`; `used` is this process's resident memory, as A1111 reports."""
    try:
        rss = psutil.Process(os.getpid()).memory_info().rss
        total = psutil.virtual_memory().total
        ram: dict[str, Any] = {"free": max(total - rss, 0), "used": rss, "total": total}
    except Exception as exc:  # noqa: BLE001
        ram = {"error": str(exc)}
    return {"ram": ram, "cuda": dict(cuda) if cuda is not None else cuda_memory()}


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def _secret_strings(value: Any) -> set[str]:
    """The pieces of a credential value worth scrubbing elsewhere: the whole, each `user:pass`, each password."""
    if isinstance(value, (list, tuple, set)):
        return set().union(*(_secret_strings(v) for v in value)) if value else set()
    if not isinstance(value, str) or not value:
        return set()
    found = {value}
    for pair in value.split(","):
        pair = pair.strip()
        if pair:
            found.add(pair)
            if ":" in pair:
                password = pair.split(":", 1)[1]
                if len(password) >= 3:  # a 1-2 character fragment would scrub unrelated text
                    found.add(password)
    return found


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def _scrub(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, str):
        for secret in sorted(secrets, key=len, reverse=True):
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    return value


def _redact(key: str, value: Any) -> Any:
    # A credential that is set reads "***" (clients may check auth is on); an unset one keeps its null/empty.
    if value is None or isinstance(value, bool) or value in ("", [], ()):
        return value
    return REDACTED


def cmd_flags(settings: Mapping[str, Any] | Any) -> dict[str, Any]:
    """`/cmd-flags` from the server's settings (a mapping or a dataclass), with every credential redacted.

    Keys naming a credential (see SECRET_MARKERS) read "***" when set; and their values are also scrubbed out of
    every other value (a raw argument list, say), so a password never leaves the server.
    """
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        data = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    else:
        data = dict(settings)
    secrets: set[str] = set()
    for key, value in data.items():
        if _is_secret_key(str(key)):
            secrets |= _secret_strings(value)
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if _is_secret_key(key):
            out[key] = _redact(key, value)
        else:
            out[key] = _scrub(_jsonable(value), secrets)
    return out
