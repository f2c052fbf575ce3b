"""sdserver's own asynchronous job API under `/sdserver/v1`: submit, poll, cancel, stream progress.

Bodies are A1111's txt2img/img2img requests and a finished job's `result` is A1111's response, so a client can
move from the blocking A1111 call to submit-then-poll without changing its payloads.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from sdserver.api.a1111.routes import build_generation_response, prepare_generation, submit_generation
from sdserver.api.a1111.schemas import GenerationRequestBase, Img2ImgRequest, Txt2ImgRequest
from sdserver.api.errors import error_body
from sdserver.errors import SdServerError
from sdserver.jobs import JobInfo, JobQueue, JobState, UnknownJob
from sdserver.settings import Settings

PREFIX = "/sdserver/v1"
_EVENT_INTERVAL_S = 0.25
# The SSE event that ends a stream, per final state.
_FINAL_EVENTS = {JobState.SUCCEEDED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def preview_base64(image: Image.Image | None, fmt: str = "png") -> str | None:
    if image is None:
        return None
    pil_format = _PIL_FORMATS.get(fmt.lower(), "PNG")
    buffer = io.BytesIO()
    (image.convert("RGB") if pil_format == "JPEG" else image).save(buffer, format=pil_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def job_error(error: BaseException | None) -> dict[str, Any] | None:
    if error is None:
        return None
    if isinstance(error, SdServerError):
        return error_body(type(error).__name__, error.message, field=error.field)
    # Not a typed error: the class only; the details are in the server log.
    return error_body(type(error).__name__, "Internal server error; the server log has the details.")


def job_status(info: JobInfo, *, preview_format: str = "png", with_preview: bool = True) -> dict[str, Any]:
    """A job's state without its result (blocking when it encodes a preview)."""
    return {
        "id": info.id,
        "status": info.state.value,
        "kind": info.name,
        "queue_position": info.queue_position,
        "progress": info.fraction(),
        "eta": info.eta(time.monotonic()),
        "job_no": info.job_no,
        "job_count": info.pass_count,
        "step": info.sampling_step,
        "steps": info.sampling_steps,
        "interrupted": info.interrupted,
        "preview_id": info.preview_id,
        "preview": preview_base64(info.preview, preview_format) if with_preview else None,
        "job_timestamp": info.timestamp,
        "error": job_error(info.error),
    }


def job_body(info: JobInfo, *, preview_format: str = "png") -> dict[str, Any]:
    """A job's state, plus its A1111 response once it succeeded (blocking: encodes images)."""
    body = job_status(info, preview_format=preview_format, with_preview=not info.state.finished)
    # A synchronous A1111 request's images went out with its response and are no longer kept.
    delivered = info.state is JobState.SUCCEEDED and info.result is not None
    body["result"] = build_generation_response(info) if delivered else None
    return body


def _preview_format(request: Request) -> str:
    return str(request.app.state.options.get("live_previews_image_format", "png"))


def _require(queue: JobQueue, job_id: str) -> JobInfo:
    info = queue.get(job_id)
    if info is None or info.context is None:  # context-less jobs (model switches) are internal
        raise UnknownJob(f"No job with id {job_id!r} (unknown, or its result expired).", field="id")
    return info


async def _submit(request: Request, req: GenerationRequestBase) -> JSONResponse:
    state = request.app.state
    gen, ctx = await run_in_threadpool(prepare_generation, state, req)
    info = submit_generation(state, gen, ctx, job_id=req.force_task_id)
    url = f"{request.scope.get('root_path', '')}{PREFIX}/jobs/{info.id}"
    return JSONResponse({"id": info.id, "status": info.state.value, "poll_url": url}, status_code=202)


async def submit_txt2img(request: Request, req: Txt2ImgRequest) -> JSONResponse:
    return await _submit(request, req)


async def submit_img2img(request: Request, req: Img2ImgRequest) -> JSONResponse:
    return await _submit(request, req)


async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    info = _require(request.app.state.queue, job_id)
    return await run_in_threadpool(job_body, info, preview_format=_preview_format(request))


def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    queue: JobQueue = request.app.state.queue
    _require(queue, job_id)
    info = queue.cancel(job_id)
    return {"id": info.id, "status": info.state.value, "cancel_requested": not info.state.finished}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=lambda _o: None)}\n\n"


async def job_events(request: Request, job_id: str) -> StreamingResponse:
    queue: JobQueue = request.app.state.queue
    _require(queue, job_id)
    fmt = _preview_format(request)

    async def stream() -> AsyncIterator[str]:
        last_preview = -1
        async for info in queue.watch(job_id, interval=_EVENT_INTERVAL_S):
            if info.state.finished:
                body = await run_in_threadpool(job_body, info, preview_format=fmt)
                yield _sse(_FINAL_EVENTS[info.state], body)
                return
            # Send a preview image only when it changed; every other event is a few hundred bytes.
            fresh = info.preview_id != last_preview
            last_preview = info.preview_id
            body = await run_in_threadpool(job_status, info, preview_format=fmt, with_preview=fresh)
            yield _sse("progress", body)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def health() -> dict[str, str]:
    return {"status": "ok"}


def build_router(settings: Settings) -> APIRouter:
    r = APIRouter(prefix=PREFIX, tags=["sdserver jobs"])
    r.add_api_route("/jobs/txt2img", submit_txt2img, methods=["POST"], status_code=202)
    r.add_api_route("/jobs/img2img", submit_img2img, methods=["POST"], status_code=202)
    r.add_api_route("/jobs/{job_id}", get_job, methods=["GET"])
    r.add_api_route("/jobs/{job_id}", cancel_job, methods=["DELETE"])
    r.add_api_route("/jobs/{job_id}/events", job_events, methods=["GET"])
    r.add_api_route("/health", health, methods=["GET"])
    return r
