"""Command line: A1111's flags (and `COMMANDLINE_ARGS`, as webui-user.sh) → Settings → uvicorn.

Flags A1111 has but sdserver does not act on are accepted, and listed in one warning line; so is any other
unknown `--flag`, so a launch line written for A1111 never stops the server from starting.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdserver.settings import Credential, Limits, Settings

log = logging.getLogger("sdserver")

A1111_DEFAULT_PORT = 7860
A1111_NOWEBUI_PORT = 7861  # A1111's API-only mode listens here when --port is not given

# A1111 flags that sdserver accepts and ignores. Switches first, then flags that take a value.
IGNORED_SWITCHES = (
    "--xformers", "--force-enable-xformers", "--xformers-flash-attention", "--reinstall-xformers",
    "--reinstall-torch", "--lowram", "--opt-sdp-attention",
    "--opt-sdp-no-mem-attention", "--opt-split-attention", "--opt-split-attention-v1",
    "--opt-split-attention-invokeai", "--opt-sub-quad-attention", "--disable-opt-split-attention",
    "--opt-channelslast", "--upcast-sampling", "--enable-insecure-extension-access", "--autolaunch", "--share",
    "--disable-safe-unpickle", "--disable-nan-check", "--no-download-sd-model", "--no-prompt-history",
    "--disable-all-extensions", "--disable-extra-extensions", "--no-gradio-queue", "--skip-torch-cuda-test",
    "--skip-python-version-check", "--skip-version-check", "--skip-install", "--skip-prepare-environment",
    "--update-check", "--update-all-extensions", "--hide-ui-dir-config", "--gradio-debug",
    "--disable-console-progressbars", "--enable-console-prompts", "--administrator", "--do-not-download-clip",
    "--allow-code", "--ui-debug-mode", "--log-startup", "--use-ipex", "--use-directml", "--disable-tls-verify",
    "--unload-gfpgan", "--no-progressbar-hiding", "--dump-sysinfo", "--disable-model-loading-ram-optimization",
    "--api-notifications",
)
IGNORED_OPTIONS = (
    "--theme", "--gradio-auth", "--gradio-auth-path", "--gradio-allowed-path", "--gradio-queue", "--ngrok",
    "--ngrok-region", "--ngrok-options", "--localizations-dir", "--ui-config-file", "--ui-settings-file",
    "--styles-file", "--config", "--gfpgan-dir", "--gfpgan-model", "--gfpgan-models-path",
    "--codeformer-models-path", "--bsrgan-models-path", "--realesrgan-models-path", "--clip-models-path",
    "--dat-models-path", "--scunet-models-path", "--swinir-models-path", "--ldsr-models-path",
    "--textual-inversion-templates-dir", "--gradio-img2img-tool", "--gradio-inpaint-tool", "--loglevel",
    "--freeze-specific-settings", "--tls-keyfile-password", "--ckpt-dirs", "--vae-dirs", "--lyco-dir-backcompat",
    "--controlnet-dir", "--controlnet-preprocessor-models-dir", "--server-name-bind", "--forge-ref-a1111-home",
)
_SECRET_DESTS = frozenset({"api_auth", "gradio_auth"})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdserver",
        description="A local Stable Diffusion server speaking the AUTOMATIC1111 webui HTTP API.",
        allow_abbrev=False,  # an abbreviation of an unknown A1111 flag must not match one of ours
    )
    g = p.add_argument_group("serving")
    g.add_argument("--api", action="store_true", help="serve the API (always on; accepted for A1111 launch lines)")
    g.add_argument("--nowebui", action="store_true", help="API only, no browser UI; default port 7861 as A1111")
    g.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 instead of 127.0.0.1")
    g.add_argument("--server-name", help="host to bind (overrides --listen)")
    g.add_argument("--port", type=int, help="port (default 7860; 7861 with --nowebui)")
    g.add_argument("--subpath", default="", help="serve under this path prefix, for a reverse proxy")
    g.add_argument("--tls-keyfile", help="TLS key file (HTTPS)")
    g.add_argument("--tls-certfile", help="TLS certificate file (HTTPS)")
    g.add_argument("--timeout-keep-alive", type=int, default=30, help="HTTP keep-alive in seconds")
    g.add_argument("--api-log", action="store_true", help="log one line per request (never bodies or secrets)")
    g.add_argument("--api-server-stop", action="store_true", help="enable server-stop/server-kill/server-restart")
    g = p.add_argument_group("auth and CORS")
    g.add_argument("--api-auth", help='HTTP Basic credentials "user:pass[,user2:pass2]" for every route')
    g.add_argument("--api-auth-file", help="file of credentials: one or more user:pass per line, comma-separated")
    g.add_argument("--cors-allow-origins", help="comma-separated origins allowed by CORS (* for any)")
    g.add_argument("--cors-allow-origins-regex", help="regular expression of origins allowed by CORS")
    g = p.add_argument_group("locations (A1111's layout under --data-dir)")
    g.add_argument("--data-dir", default=None, help="base folder (default: the current directory)")
    g.add_argument("--models-dir", help="models folder (default: DATA_DIR/models)")
    g.add_argument("--ckpt-dir", help="checkpoints (default: MODELS_DIR/Stable-diffusion)")
    g.add_argument("--ckpt", help="checkpoint to load at start")
    g.add_argument("--vae-dir", help="VAE folder (default: MODELS_DIR/VAE)")
    g.add_argument("--vae-path", help="VAE file used with every checkpoint (overrides the sd_vae option)")
    g.add_argument("--lora-dir", help="LoRA folder (default: MODELS_DIR/Lora)")
    g.add_argument("--embeddings-dir", help="textual-inversion embeddings (default: DATA_DIR/embeddings)")
    g.add_argument("--hypernetwork-dir", help="hypernetworks (default: MODELS_DIR/hypernetworks)")
    g.add_argument("--esrgan-models-path", help="ESRGAN upscalers (default: MODELS_DIR/ESRGAN)")
    g = p.add_argument_group("device and precision")
    g.add_argument("--device-id", help="CUDA device index")
    g.add_argument("--use-cpu", nargs="+", default=[], help="run these modules on the CPU ('all' for everything)")
    g.add_argument("--precision", choices=("full", "half", "autocast"), default="autocast")
    g.add_argument("--no-half", action="store_true", help="fp32 weights")
    g.add_argument("--no-half-vae", action="store_true", help="fp32 VAE")
    g.add_argument("--medvram", action="store_true",
                   help="CUDA: text encoders, UNet and VAE on the GPU only while each runs (less VRAM, slower)")
    g.add_argument("--medvram-sdxl", action="store_true", help="--medvram for SDXL models only")
    g.add_argument("--lowvram", action="store_true",
                   help="CUDA: as --medvram, and the UNet's blocks one at a time (least VRAM, slowest)")
    g = p.add_argument_group("behaviour")
    g.add_argument("--skip-load-model-at-start", action="store_true")
    g.add_argument("--no-hashing", action="store_true", help="do not compute checkpoint sha256")
    g.add_argument("--freeze-settings", action="store_true", help="refuse POST /sdapi/v1/options")
    g.add_argument("--queue-size", type=_positive_int, default=64, help="jobs that may wait (503 beyond)")
    g.add_argument("--job-ttl", type=float, default=3600.0, help="seconds a finished job's result is kept")
    g.add_argument("--cancel-on-disconnect", action="store_true",
                   help="cancel a synchronous job when its client hangs up")
    g.add_argument("--api-allow-remote-images", action="store_true",
                   help="allow http(s) URLs in image fields (off: no server-side requests)")
    g = p.add_argument_group("limits")
    d = Limits()
    g.add_argument("--max-width", type=_positive_int, default=d.max_width)
    g.add_argument("--max-height", type=_positive_int, default=d.max_height)
    g.add_argument("--max-pixels", type=_positive_int, default=d.max_pixels, help="width*height")
    g.add_argument("--max-steps", type=_positive_int, default=d.max_steps)
    g.add_argument("--max-batch", type=_positive_int, default=d.max_batch, help="batch_size*n_iter")
    g.add_argument("--max-body-bytes", type=_positive_int, default=d.max_body_bytes)
    g.add_argument("--max-image-pixels", type=_positive_int, default=d.max_image_pixels,
                   help="pixels of a decoded input image")
    g.add_argument("--max-prompt-chars", type=_positive_int, default=d.max_prompt_chars)
    g = p.add_argument_group("A1111 flags accepted and ignored")
    for flag in IGNORED_SWITCHES:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in IGNORED_OPTIONS:
        g.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return p


def parse_credentials(text: str) -> tuple[Credential, ...]:
    """`user:pass[,user2:pass2]`; the password is everything after the first ':'."""
    credentials = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            # Never echo the item: it may be a password typed in the wrong place.
            raise ValueError("credentials must be written user:password")
        credentials.append(Credential(user, password))
    return tuple(credentials)


def read_credentials_file(path: str | Path) -> tuple[Credential, ...]:
    """One or more comma-separated user:pass per line; blank lines and '#' comments skipped."""
    credentials: list[Credential] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            credentials.extend(parse_credentials(line))
    return tuple(credentials)


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _ignored_flags(ns: argparse.Namespace, unknown: Sequence[str]) -> list[str]:
    given = [
        flag
        for flag in (*IGNORED_SWITCHES, *IGNORED_OPTIONS)
        if getattr(ns, flag[2:].replace("-", "_")) not in (None, False)
    ]
    given += [token.split("=", 1)[0] for token in unknown if token.startswith("-")]
    return list(dict.fromkeys(given))


def settings_from_namespace(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags (A1111's defaults and rules for ports, hosts and folders)."""
    credentials: tuple[Credential, ...] = ()
    if ns.api_auth:
        credentials += parse_credentials(ns.api_auth)
    if ns.api_auth_file:
        credentials += read_credentials_file(ns.api_auth_file)
    port = ns.port if ns.port is not None else (A1111_NOWEBUI_PORT if ns.nowebui else A1111_DEFAULT_PORT)
    host = ns.server_name or ("0.0.0.0" if ns.listen else "127.0.0.1")
    subpath = ns.subpath.strip()
    if subpath and not subpath.startswith("/"):
        subpath = "/" + subpath
    flags = {k: ("<redacted>" if k in _SECRET_DESTS and v else v) for k, v in vars(ns).items()}
    return Settings(
        host=host,
        port=port,
        webui=not ns.nowebui,
        subpath=subpath.rstrip("/"),
        tls_keyfile=ns.tls_keyfile,
        tls_certfile=ns.tls_certfile,
        timeout_keep_alive=ns.timeout_keep_alive,
        api_log=ns.api_log,
        api_server_stop=ns.api_server_stop,
        api_auth=credentials,
        cors_allow_origins=tuple(o.strip() for o in (ns.cors_allow_origins or "").split(",") if o.strip()),
        cors_allow_origins_regex=ns.cors_allow_origins_regex or None,
        data_dir=_path(ns.data_dir) or Path.cwd(),
        models_dir=_path(ns.models_dir),
        ckpt_dir=_path(ns.ckpt_dir),
        ckpt=_path(ns.ckpt),
        vae_dir=_path(ns.vae_dir),
        vae_path=_path(ns.vae_path),
        lora_dir=_path(ns.lora_dir),
        embeddings_dir=_path(ns.embeddings_dir),
        hypernetwork_dir=_path(ns.hypernetwork_dir),
        esrgan_models_path=_path(ns.esrgan_models_path),
        device_id=ns.device_id,
        use_cpu=tuple(ns.use_cpu),
        precision=ns.precision,
        no_half=ns.no_half,
        no_half_vae=ns.no_half_vae,
        medvram=ns.medvram,
        medvram_sdxl=ns.medvram_sdxl,
        lowvram=ns.lowvram,
        skip_load_model_at_start=ns.skip_load_model_at_start,
        no_hashing=ns.no_hashing,
        freeze_settings=ns.freeze_settings,
        queue_size=ns.queue_size,
        job_ttl=ns.job_ttl,
        cancel_on_disconnect=ns.cancel_on_disconnect,
        api_allow_remote_images=ns.api_allow_remote_images,
        limits=Limits(
            max_width=ns.max_width,
            max_height=ns.max_height,
            max_pixels=ns.max_pixels,
            max_steps=ns.max_steps,
            max_batch=ns.max_batch,
            max_body_bytes=ns.max_body_bytes,
            max_image_pixels=ns.max_image_pixels,
            max_prompt_chars=ns.max_prompt_chars,
        ),
        cmd_flags=tuple(flags.items()),
    )


def command_line(argv: Sequence[str] | None, environ: Mapping[str, str]) -> list[str]:
    """`COMMANDLINE_ARGS` (shell-quoted, as webui-user.sh) followed by argv."""
    return shlex.split(environ.get("COMMANDLINE_ARGS", "")) + list(argv or [])


def load_settings(
    argv: Sequence[str] | None, environ: Mapping[str, str], *, logger: logging.Logger = log
) -> Settings:
    """Parse the command line into Settings, warning once about the flags that have no effect."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(command_line(argv, environ))
    try:
        settings = settings_from_namespace(ns)
    except (OSError, ValueError) as exc:
        parser.error(f"--api-auth/--api-auth-file: {exc}")
    ignored = _ignored_flags(ns, unknown)
    if ignored:
        logger.warning("Ignoring flags sdserver does not act on: %s", " ".join(ignored))
    return settings


def _uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_keyfile=settings.tls_keyfile,
        ssl_certfile=settings.tls_certfile,
        timeout_keep_alive=settings.timeout_keep_alive,
        root_path=settings.subpath,  # behind a reverse proxy: prefixed or stripped paths both route
        timeout_graceful_shutdown=max(int(settings.shutdown_grace), 1),
        access_log=False,  # --api-log is the access log, in A1111's format
        log_level="info",
    )


def build_server(settings: Settings, *, engine: Any = None) -> Any:
    """The uvicorn server for `settings` (a given engine replaces the real one, for tests).

    On SIGINT/SIGTERM (or server-stop) it first stops the queue taking jobs and cancels the queued ones, so
    requests waiting on them answer at once; the running job gets `shutdown_grace` seconds to finish.
    """
    import uvicorn

    from sdserver.app import ServerControl, create_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            queue = getattr(app.state, "queue", None)
            if queue is not None:
                queue.stop_accepting()
            await super().shutdown(sockets)

    holder: list[Server] = []

    def stop() -> None:
        holder[0].should_exit = True

    app = create_app(settings, engine=engine, control=ServerControl(stop=stop))
    server = Server(_uvicorn_config(app, settings))
    holder.append(server)
    return server


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM or server-stop."""
    server = build_server(settings)
    scheme = "https" if settings.tls_certfile else "http"
    log.info("sdserver on %s://%s:%d%s", scheme, settings.host, settings.port, settings.subpath or "/")
    server.run()


def main(argv: Sequence[str] | None = None) -> None:
    # Hugging Face libraries read these at import time; set them before anything could import one.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
    serve(settings)
