"""A1111's routes (`/sdapi/v1/*`, `/internal/*`, `/login`), thin: translate, queue, wait, answer.

Generation and everything that touches the model goes through the job queue; handlers only wait on it
(`await`), so the event loop never blocks and /progress answers at once. Listings and progress are plain `def`
handlers (FastAPI runs them in its thread pool) because they may read files or encode a preview image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from sdserver import __version__
from sdserver.api.a1111 import listings, names, translate
from sdserver.api.a1111.images import decode_image, encode_image
from sdserver.api.a1111.infotext import png_info, version_string
from sdserver.api.a1111.options import RESTRICTED_KEYS, coerce_option, split_model_keys
from sdserver.api.a1111.saving import save_outputs
from sdserver.api.a1111.progress import internal_progress_response, progress_response
from sdserver.api.a1111.schemas import (
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    GenerationRequestBase,
    GenerationResponse,
    Img2ImgRequest,
    InternalProgressRequest,
    InterrogateRequest,
    PendingTasksResponse,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from sdserver.api.auth import TOKEN_COOKIE, Authenticator, credentials_match, parse_login_form
from sdserver.api.errors import SettingsFrozen
from sdserver.engine.types import Engine, GenerationRequest
from sdserver.errors import ModelNotFound
from sdserver.jobs import DuplicateJobId, JobInfo, JobKind, JobQueue, result_of
from sdserver.settings import Settings

log = logging.getLogger(__name__)

SDAPI = "/sdapi/v1"
_TASK_ID_CHARS = string.ascii_uppercase + string.digits
_TASK_ID_LENGTH = 7  # A1111's generated task ids: task(txt2img-XXXXXXX)
_DISCONNECT_POLL_S = 0.5


# ---- shared with the native job API ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationContext:
    """What a generation job carries so its A1111 response can be built when it ends."""

    request: GenerationRequestBase
    options: Mapping[str, Any]
    data_dir: Path  # where `save_images` writes outputs/


def translate_limits(settings: Settings) -> translate.Limits:
    limits = settings.limits
    return translate.Limits(
        max_width=limits.max_width,
        max_height=limits.max_height,
        max_pixels=limits.max_pixels,
        max_steps=limits.max_steps,
        max_images=limits.max_batch,
        max_prompt_length=limits.max_prompt_chars,
        max_input_pixels=limits.max_image_pixels,
    )


def random_seed() -> int:
    return random.randrange(translate.SEED_RANGE)


def new_task_id(kind: str) -> str:
    suffix = "".join(random.choices(_TASK_ID_CHARS, k=_TASK_ID_LENGTH))
    return f"task({kind}-{suffix})"


def _decoder(settings: Settings) -> Callable[[str, str], Any]:
    def decode(data: str, field: str) -> Any:
        return decode_image(
            data, field, max_pixels=settings.limits.max_image_pixels, allow_remote=settings.api_allow_remote_images
        )

    return decode


def prepare_generation(state: Any, req: GenerationRequestBase) -> tuple[GenerationRequest, GenerationContext]:
    """A1111 body → internal request (blocking: decodes images; run it in a thread)."""
    settings: Settings = state.settings
    options = state.options.snapshot()
    common = dict(
        default_size=state.engine.default_size(),
        random_seed=random_seed,
        styles=state.styles,
        limits=translate_limits(settings),
    )
    if isinstance(req, Img2ImgRequest):
        gen = translate.img2img_request(req, options, decode=_decoder(settings), **common)
    else:
        assert isinstance(req, Txt2ImgRequest)
        gen = translate.txt2img_request(req, options, **common)
    return gen, GenerationContext(request=req, options=options, data_dir=settings.data_dir)


def generation_work(gen: GenerationRequest, *, restore: bool, options: Any) -> Callable[[Engine, Any], Any]:
    """Generate; with a per-request checkpoint (override_settings), afterwards either load the previous model
    back (A1111's override_settings_restore_afterwards, the default) or make the options name the new one."""

    def work(engine: Engine, control: Any) -> Any:
        before = engine.current_checkpoint() if gen.checkpoint else None
        try:
            return engine.generate(gen, control)
        finally:
            if gen.checkpoint:
                _after_override(engine, before, restore=restore, options=options)

    return work


def _after_override(engine: Engine, before: Any, *, restore: bool, options: Any) -> None:
    try:
        current = engine.current_checkpoint()
        if restore and before is not None and current != before:
            engine.load_checkpoint(before.title)
        elif not restore and current is not None:
            options.update(
                {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256 or ""},
                read_only=RESTRICTED_KEYS,
            )
    except Exception:  # the generation's own outcome matters more; the next request loads what it needs
        log.exception("restoring the checkpoint after an override_settings request failed")


def submit_generation(state: Any, gen: GenerationRequest, ctx: GenerationContext, *, job_id: str | None) -> JobInfo:
    kind = "img2img" if gen.is_img2img else "txt2img"
    queue: JobQueue = state.queue
    restore = bool(getattr(ctx.request, "override_settings_restore_afterwards", True))
    try:
        return queue.submit(
            generation_work(gen, restore=restore, options=state.options),
            kind=JobKind.GENERATE,
            name=f"scripts_{kind}",
            job_id=job_id or new_task_id(kind),
            request=gen,
            passes=gen.n_iter,
            context=ctx,
        )
    except DuplicateJobId as exc:
        exc.field = "force_task_id"
        raise


def build_generation_response(info: JobInfo) -> dict[str, Any]:
    """The A1111 `{images, parameters, info}` of a finished generation job (blocking: encodes images)."""
    result = result_of(info)
    ctx: GenerationContext = info.context
    assert info.request is not None
    seeds = [image.seed for image in result.images]
    kind = "img2img" if info.request.is_img2img else "txt2img"

    def save(pictures: list[Any], infotexts: list[str], grid_first: bool, opts: Mapping[str, Any]) -> None:
        save_outputs(pictures, infotexts, seeds, grid_first=grid_first, kind=kind, data_dir=ctx.data_dir, opts=opts)

    return translate.generation_response(
        ctx.request, info.request, result, ctx.options, job_timestamp=info.timestamp,
        version=version_string(__version__), save=save,
    )


async def wait_for_job(request: Request, queue: JobQueue, job_id: str, *, cancel_on_disconnect: bool) -> JobInfo:
    """Wait without blocking the loop; with cancel_on_disconnect, a client that hangs up cancels the job."""
    if not cancel_on_disconnect:
        return await queue.wait(job_id)
    waiter = asyncio.ensure_future(queue.wait(job_id))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=_DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                queue.cancel(job_id)
                return await waiter
    finally:
        waiter.cancel()


async def run_queued(queue: JobQueue, work: Callable[[Engine, Any], Any], kind: JobKind, name: str) -> Any:
    """Run engine work serialised with the generations; its error propagates."""
    info = queue.submit(work, kind=kind, name=name)
    return await queue.result(info.id)


# ---- generation -------------------------------------------------------------------------------------------


async def _generate(request: Request, req: GenerationRequestBase) -> dict[str, Any]:
    state = request.app.state
    gen, ctx = await run_in_threadpool(prepare_generation, state, req)
    info = submit_generation(state, gen, ctx, job_id=req.force_task_id)
    final = await wait_for_job(
        request, state.queue, info.id, cancel_on_disconnect=state.settings.cancel_on_disconnect
    )
    try:
        return await run_in_threadpool(build_generation_response, final)
    finally:
        # This response is the only delivery of a synchronous job's images: don't hold them for --job-ttl.
        state.queue.drop_result(final.id)


async def txt2img(request: Request, req: Txt2ImgRequest) -> dict[str, Any]:
    return await _generate(request, req)


async def img2img(request: Request, req: Img2ImgRequest) -> dict[str, Any]:
    return await _generate(request, req)


# ---- extras, png-info, interrogate ---------------------------------------------------------------------------


def _extras_params(req: ExtrasSingleImageRequest | ExtrasBatchImagesRequest) -> Any:
    # Imported here: the pipeline pulls in torch, which creating the app must not.
    from sdserver.pipeline.extras import ExtrasParams

    names = {f.name for f in dataclasses.fields(ExtrasParams)}
    return ExtrasParams(**{k: v for k, v in req.model_dump().items() if k in names and v is not None})


def _extras_image(state: Any, data: str, field: str) -> Image.Image:
    settings: Settings = state.settings
    return decode_image(
        data, field, max_pixels=settings.limits.max_image_pixels, allow_remote=settings.api_allow_remote_images
    )


def extras_single(state: Any, req: ExtrasSingleImageRequest) -> dict[str, Any]:
    image, html = state.engine.extras(_extras_image(state, req.image, "image"), _extras_params(req))
    fmt = state.options.get("samples_format") or "png"
    return {"html_info": html, "image": encode_image(image, fmt, image.info.get("parameters"))}


def extras_batch(state: Any, req: ExtrasBatchImagesRequest) -> dict[str, Any]:
    params, fmt = _extras_params(req), state.options.get("samples_format") or "png"
    images, html = [], ""
    for i, item in enumerate(req.imageList):
        image, html = state.engine.extras(_extras_image(state, item.data, f"imageList[{i}].data"), params)
        images.append(encode_image(image, fmt, image.info.get("parameters")))
    return {"html_info": html, "images": images}


async def extra_single_image(request: Request, req: ExtrasSingleImageRequest) -> dict[str, Any]:
    return await run_in_threadpool(extras_single, request.app.state, req)


async def extra_batch_images(request: Request, req: ExtrasBatchImagesRequest) -> dict[str, Any]:
    return await run_in_threadpool(extras_batch, request.app.state, req)


def pnginfo(request: Request, req: PngInfoRequest) -> dict[str, Any]:
    if not req.image.strip():
        return {"info": "", "items": {}, "parameters": {}}  # A1111 answers an empty image with an empty info
    settings: Settings = request.app.state.settings
    image = decode_image(
        req.image, "image", max_pixels=settings.limits.max_image_pixels, allow_remote=settings.api_allow_remote_images
    )
    return png_info(image)


def interrogate(req: InterrogateRequest) -> dict[str, Any]:
    # sdserver ships no CLIP interrogator or DeepDanbooru model: A1111's answer for a model it doesn't have.
    raise ModelNotFound("Model not found", field="model")


# ---- progress, interrupt, skip ----------------------------------------------------------------------------------


async def progress(request: Request, skip_current_image: bool = Query(False)) -> dict[str, Any]:
    # Answered on the event loop unless there is an image to encode: a thread pool busy with image decoding
    # must never delay /progress (clients poll it with short timeouts while their request runs).
    state = request.app.state
    snapshot = state.queue.snapshot()
    answer = partial(
        progress_response,
        snapshot,
        skip_current_image=skip_current_image,
        image_format=str(state.options.get("live_previews_image_format", "png")),
    )
    if skip_current_image or snapshot.current_image is None:
        return answer()
    return await run_in_threadpool(answer)


def interrupt(request: Request) -> dict[str, Any]:
    request.app.state.queue.interrupt()
    return {}


def skip(request: Request) -> None:
    request.app.state.queue.skip()
    return None


def internal_progress(request: Request, req: InternalProgressRequest) -> dict[str, Any]:
    state = request.app.state
    queue: JobQueue = state.queue
    snapshot = queue.snapshot()
    running = queue.get(snapshot.job_id) if snapshot.job_id else None
    return internal_progress_response(
        snapshot,
        id_task=req.id_task,
        id_live_preview=req.id_live_preview,
        live_preview=req.live_preview,
        queued_ids=queue.pending_ids(),
        completed_ids=set(queue.completed_ids()),
        preview_id=running.preview_id if running is not None else 0,
        image_format=str(state.options.get("live_previews_image_format", "png")),
        live_previews_enable=bool(state.options.get("live_previews_enable", True)),
    )


def pending_tasks(request: Request) -> dict[str, Any]:
    tasks = request.app.state.queue.pending_ids()
    return {"size": len(tasks), "tasks": tasks}


def ping() -> dict[str, Any]:
    return {}


# ---- options and flags --------------------------------------------------------------------------------------


def get_options(request: Request) -> dict[str, Any]:
    return request.app.state.options.snapshot()


def _switch_model(options: Any, name: str) -> Callable[[Engine, Any], None]:
    def work(engine: Engine, control: Any) -> None:
        try:
            checkpoint = engine.load_checkpoint(name)
        except ModelNotFound as exc:
            if exc.field is None:
                exc.field = "sd_model_checkpoint"
            raise
        options.update(
            {"sd_model_checkpoint": checkpoint.title, "sd_checkpoint_hash": checkpoint.sha256 or ""},
            read_only=RESTRICTED_KEYS,
        )

    return work


async def set_options(request: Request, values: dict[str, Any] = Body(...)) -> None:
    state = request.app.state
    if state.settings.freeze_settings:
        raise SettingsFrozen("Settings are frozen (--freeze-settings); POST /options is refused.")
    options = state.options
    model_keys, other = split_model_keys(values)
    defaults = options.defaults()
    for key, value in other.items():  # validate everything before anything changes
        coerce_option(key, value, defaults.get(key))
    wanted = model_keys.get("sd_model_checkpoint")
    # Clients post GET's whole dict back: the checkpoint that is already current must not queue a reload.
    if wanted and wanted != options.get("sd_model_checkpoint"):
        await run_queued(state.queue, _switch_model(options, str(wanted)), JobKind.LOAD_CHECKPOINT, "load_checkpoint")
    options.update(other)
    return None


def get_cmd_flags(request: Request) -> dict[str, Any]:
    return listings.cmd_flags(request.app.state.settings.flags())


# ---- listings ------------------------------------------------------------------------------------------------


def get_samplers() -> list[dict[str, Any]]:
    return names.samplers_listing()


def get_schedulers() -> list[dict[str, Any]]:
    return names.schedulers_listing()


def get_upscalers(request: Request) -> list[dict[str, Any]]:
    return [dataclasses.asdict(u) for u in request.app.state.engine.upscaler_list()]


def get_realesrgan_models(request: Request) -> list[dict[str, Any]]:
    return [dataclasses.asdict(m) for m in request.app.state.engine.realesrgan_models()]


def get_loras(request: Request) -> list[dict[str, Any]]:
    return request.app.state.engine.lora_list()


def get_latent_upscale_modes() -> list[dict[str, Any]]:
    return listings.latent_upscale_modes()


def get_sd_models(request: Request) -> list[dict[str, Any]]:
    return listings.sd_models_listing(request.app.state.engine.checkpoints())


def get_sd_vae(request: Request) -> list[dict[str, Any]]:
    return listings.sd_vae_listing(request.app.state.engine.vae_list())


def get_prompt_styles(request: Request) -> list[dict[str, Any]]:
    return listings.prompt_styles_listing(request.app.state.styles)


def get_embeddings(request: Request) -> dict[str, Any]:
    return request.app.state.engine.embedding_listing()


def get_scripts() -> dict[str, Any]:
    return listings.scripts_listing()


def get_script_info() -> list[dict[str, Any]]:
    return listings.script_info_listing()


def empty_list() -> list[Any]:
    """hypernetworks, face-restorers, extensions: sdserver has none."""
    return []


def get_memory() -> dict[str, Any]:
    return listings.memory_info()


# ---- refresh, unload, reload --------------------------------------------------------------------------------


def _sync_options_after(state: Any, action: Callable[[Engine], None]) -> Callable[[Engine, Any], None]:
    def work(engine: Engine, control: Any) -> None:
        action(engine)
        current = engine.current_checkpoint()
        if current is not None:
            state.options.update(
                {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256 or ""},
                read_only=RESTRICTED_KEYS,
            )

    return work


def _optional_hook(name: str) -> Callable[[Engine, Any], None]:
    """Engine methods some engines have (refresh_vae, ...): a no-op where absent."""

    def work(engine: Engine, control: Any) -> None:
        hook = getattr(engine, name, None)
        if callable(hook):
            hook()

    return work


async def refresh_checkpoints(request: Request) -> None:
    state = request.app.state
    work = _sync_options_after(state, lambda engine: engine.refresh_checkpoints())
    await run_queued(state.queue, work, JobKind.REFRESH, "refresh_checkpoints")


def _refresh_route(hook: str) -> Callable[..., Any]:
    async def refresh(request: Request) -> None:
        await run_queued(request.app.state.queue, _optional_hook(hook), JobKind.REFRESH, hook)

    refresh.__name__ = hook
    return refresh


async def unload_checkpoint(request: Request) -> dict[str, Any]:
    await run_queued(request.app.state.queue, lambda engine, control: engine.unload(), JobKind.UNLOAD, "unload")
    return {}


async def reload_checkpoint(request: Request) -> dict[str, Any]:
    state = request.app.state
    await run_queued(state.queue, _sync_options_after(state, lambda e: e.reload()), JobKind.RELOAD, "reload")
    return {}


def _unsupported_training(what: str) -> Callable[..., Any]:
    def route(args: dict[str, Any] = Body(default_factory=dict)) -> dict[str, Any]:
        # A1111 reports create/train outcomes as `info` text with status 200.
        return {"info": f"{what}: not supported by sdserver"}

    route.__name__ = what.replace(" ", "_")
    return route


# ---- server control ------------------------------------------------------------------------------------------


def server_stop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Stopping.", background=BackgroundTask(request.app.state.control.stop))


def server_kill(request: Request) -> Response:
    return Response(status_code=200, background=BackgroundTask(request.app.state.control.kill))


def server_restart() -> Response:
    # A1111 restarts only under its launcher script; sdserver has none, so: A1111's "not possible".
    return Response(status_code=501)


# ---- login (A1111's Gradio login shapes) --------------------------------------------------------------------


def _login_route(authenticator: Authenticator) -> Callable[..., Any]:
    async def login(request: Request) -> JSONResponse:
        if not authenticator.enabled:
            return JSONResponse({"success": True})
        user, password = parse_login_form(await request.body())
        if not credentials_match(authenticator.credentials, user, password):
            return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)
        response = JSONResponse({"success": True})
        response.set_cookie(TOKEN_COOKIE, authenticator.tokens.issue(user), httponly=True, samesite="strict")
        return response

    return login


def login_check() -> None:
    # Reaching here means the auth middleware let the request through.
    return None


# ---- the router --------------------------------------------------------------------------------------------


def build_router(settings: Settings, authenticator: Authenticator) -> APIRouter:
    r = APIRouter()

    def post(path: str, endpoint: Callable[..., Any], **kw: Any) -> None:
        r.add_api_route(path, endpoint, methods=["POST"], **kw)

    def get(path: str, endpoint: Callable[..., Any], **kw: Any) -> None:
        r.add_api_route(path, endpoint, methods=["GET"], **kw)

    tags = ["A1111"]
    post(f"{SDAPI}/txt2img", txt2img, response_model=GenerationResponse, tags=tags)
    post(f"{SDAPI}/img2img", img2img, response_model=GenerationResponse, tags=tags)
    post(f"{SDAPI}/extra-single-image", extra_single_image, response_model=ExtrasSingleImageResponse, tags=tags)
    post(f"{SDAPI}/extra-batch-images", extra_batch_images, response_model=ExtrasBatchImagesResponse, tags=tags)
    post(f"{SDAPI}/png-info", pnginfo, response_model=PngInfoResponse, tags=tags)
    get(f"{SDAPI}/progress", progress, response_model=ProgressResponse, tags=tags)
    post(f"{SDAPI}/interrogate", interrogate, tags=tags)
    post(f"{SDAPI}/interrupt", interrupt, tags=tags)
    post(f"{SDAPI}/skip", skip, tags=tags)
    get(f"{SDAPI}/options", get_options, tags=tags)
    post(f"{SDAPI}/options", set_options, tags=tags)
    get(f"{SDAPI}/cmd-flags", get_cmd_flags, tags=tags)
    get(f"{SDAPI}/samplers", get_samplers, tags=tags)
    get(f"{SDAPI}/schedulers", get_schedulers, tags=tags)
    get(f"{SDAPI}/upscalers", get_upscalers, tags=tags)
    get(f"{SDAPI}/latent-upscale-modes", get_latent_upscale_modes, tags=tags)
    get(f"{SDAPI}/sd-models", get_sd_models, tags=tags)
    get(f"{SDAPI}/sd-vae", get_sd_vae, tags=tags)
    get(f"{SDAPI}/realesrgan-models", get_realesrgan_models, tags=tags)
    get(f"{SDAPI}/loras", get_loras, tags=tags)
    for path in ("hypernetworks", "face-restorers", "extensions"):
        get(f"{SDAPI}/{path}", empty_list, tags=tags, name=path)
    get(f"{SDAPI}/prompt-styles", get_prompt_styles, tags=tags)
    get(f"{SDAPI}/embeddings", get_embeddings, tags=tags)
    get(f"{SDAPI}/scripts", get_scripts, tags=tags)
    get(f"{SDAPI}/script-info", get_script_info, tags=tags)
    get(f"{SDAPI}/memory", get_memory, tags=tags)
    post(f"{SDAPI}/refresh-checkpoints", refresh_checkpoints, tags=tags)
    post(f"{SDAPI}/refresh-vae", _refresh_route("refresh_vae"), tags=tags)
    post(f"{SDAPI}/refresh-embeddings", _refresh_route("refresh_embeddings"), tags=tags)
    post(f"{SDAPI}/refresh-loras", _refresh_route("refresh_loras"), tags=tags)
    post(f"{SDAPI}/unload-checkpoint", unload_checkpoint, tags=tags)
    post(f"{SDAPI}/reload-checkpoint", reload_checkpoint, tags=tags)
    post(f"{SDAPI}/create/embedding", _unsupported_training("create embedding"), tags=tags)
    post(f"{SDAPI}/create/hypernetwork", _unsupported_training("create hypernetwork"), tags=tags)
    post(f"{SDAPI}/train/embedding", _unsupported_training("train embedding"), tags=tags)
    post(f"{SDAPI}/train/hypernetwork", _unsupported_training("train hypernetwork"), tags=tags)
    if settings.api_server_stop:
        post(f"{SDAPI}/server-stop", server_stop, tags=tags, response_class=PlainTextResponse)
        post(f"{SDAPI}/server-kill", server_kill, tags=tags)
        post(f"{SDAPI}/server-restart", server_restart, tags=tags)
    internal = ["A1111 internal"]
    post("/internal/progress", internal_progress, tags=internal)
    get("/internal/pending-tasks", pending_tasks, response_model=PendingTasksResponse, tags=internal)
    get("/internal/ping", ping, tags=internal)
    post("/login", _login_route(authenticator), tags=internal)
    get("/login_check", login_check, tags=internal)
    return r
