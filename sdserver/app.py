"""`create_app(settings)`: the FastAPI app. Its lifespan builds the engine, the options store and the job queue
and keeps them on `app.state`; nothing heavy happens at import or in `create_app` itself."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from sdserver import __version__
from sdserver.api.a1111.options import RESTRICTED_KEYS, Options, bind_engine
from sdserver.api.a1111.routes import build_router as build_a1111_router
from sdserver.api.a1111.styles import PromptStyle, read_styles_csv
from sdserver.api.auth import Authenticator, LoginTokens
from sdserver.api.errors import install_error_handlers
from sdserver.api.middleware import install_middleware
from sdserver.api.native import build_router as build_native_router
from sdserver.engine.types import Engine
from sdserver.errors import SdServerError
from sdserver.jobs import JobKind, JobQueue
from sdserver.settings import Settings
from sdserver.web import build_router as build_web_router

log = logging.getLogger(__name__)

# A1111's show_progress_every_n_steps default, used when the option holds something unreadable.
_DEFAULT_PREVIEW_EVERY = 10


def _interrupt_self() -> None:
    # SIGINT is uvicorn's graceful stop, whichever way the server was launched.
    os.kill(os.getpid(), signal.SIGINT)


def _exit_now() -> None:
    os._exit(0)


@dataclass(frozen=True)
class ServerControl:
    """What server-stop and server-kill do; the CLI passes its uvicorn server's, tests pass recorders."""

    stop: Callable[[], None] = field(default=_interrupt_self)
    kill: Callable[[], None] = field(default=_exit_now)


def preview_period(options: Options) -> int:
    """A1111's show_progress_every_n_steps, 0 (never) when live previews are off."""
    if not options.get("live_previews_enable", True):
        return 0
    try:
        return int(options.get("show_progress_every_n_steps", _DEFAULT_PREVIEW_EVERY))
    except (TypeError, ValueError):
        return _DEFAULT_PREVIEW_EVERY


def sync_model_options(engine: Engine, options: Options) -> None:
    """Make sd_model_checkpoint / sd_checkpoint_hash name the loaded model (runs on the worker thread)."""
    current = engine.current_checkpoint()
    if current is None:
        return
    options.update(
        {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256 or ""},
        read_only=RESTRICTED_KEYS,
    )


def _startup_model(settings: Settings, options: Options) -> Callable[[Engine, object], None]:
    """The first job: load the checkpoint the saved options name (unless --ckpt or --skip-load-model-at-start)."""

    def work(engine: Engine, control: object) -> None:
        wanted = options.get("sd_model_checkpoint")
        current = engine.current_checkpoint()
        names = () if current is None else (current.title, current.name, current.model_name)
        if wanted and not settings.ckpt and not settings.skip_load_model_at_start and wanted not in names:
            try:
                engine.load_checkpoint(str(wanted))
            except SdServerError as exc:
                log.warning("Saved checkpoint %r not loaded: %s", wanted, exc.message)
        sync_model_options(engine, options)

    return work


def load_styles(settings: Settings) -> dict[str, PromptStyle]:
    """A1111's styles.csv under the data dir; none when absent or unreadable."""
    path = settings.data_dir / "styles.csv"
    if not path.is_file():
        return {}
    try:
        return read_styles_csv(path)
    except (OSError, ValueError) as exc:
        log.warning("styles.csv not read: %s", exc)
        return {}


def _build_engine(settings: Settings) -> Engine:
    # Imported here: the real engine pulls in torch, which tests with a fake engine never need.
    from sdserver.engine.engine import create_engine

    return create_engine(settings)


def _lifespan(settings: Settings, given_engine: Engine | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = given_engine if given_engine is not None else await asyncio.to_thread(_build_engine, settings)
        options = Options(settings.config_file)
        bind_engine(options, engine)
        app.state.styles = load_styles(settings)
        queue = JobQueue(
            engine,
            max_queued=settings.queue_size,
            job_ttl=settings.job_ttl,
            preview_every=lambda: preview_period(options),
        )
        app.state.engine = engine
        app.state.options = options
        app.state.queue = queue
        queue.start()
        queue.submit(_startup_model(settings, options), kind=JobKind.LOAD_CHECKPOINT, name="load_checkpoint")
        try:
            yield
        finally:
            await asyncio.to_thread(queue.shutdown, settings.shutdown_grace)

    return lifespan


def create_app(
    settings: Settings, *, engine: Engine | None = None, control: ServerControl | None = None
) -> FastAPI:
    """The whole server. `engine` replaces the real one (tests); `control` what server-stop/kill do."""
    app = FastAPI(
        title="sdserver",
        version=__version__,
        description="A local Stable Diffusion server speaking the AUTOMATIC1111 webui HTTP API.",
        lifespan=_lifespan(settings, engine),
    )
    app.state.settings = settings
    app.state.control = control or ServerControl()
    app.state.login_tokens = LoginTokens()
    authenticator = Authenticator(settings.api_auth, app.state.login_tokens)
    install_error_handlers(app)
    install_middleware(app, settings, authenticator)
    app.include_router(build_a1111_router(settings, authenticator))
    app.include_router(build_native_router(settings))
    if settings.webui:
        app.include_router(build_web_router())
    return app
