"""A1111's progress bodies (`GET /sdapi/v1/progress`, `POST /internal/progress`) from a ProgressSnapshot."""

from __future__ import annotations

import time
from typing import Any, Collection, Sequence

from sdserver.api.a1111.images import encode_image
from sdserver.jobs.progress import ProgressSnapshot


def progress_state(snapshot: ProgressSnapshot) -> dict[str, Any]:
    """A1111's `shared.state.dict()`."""
    return {
        "skipped": snapshot.skipped,
        "interrupted": snapshot.interrupted,
        "stopping_generation": snapshot.stopping_generation,
        "job": snapshot.job,
        "job_count": snapshot.job_count,
        "job_timestamp": snapshot.job_timestamp,
        "job_no": snapshot.job_no,
        "sampling_step": snapshot.sampling_step,
        "sampling_steps": snapshot.sampling_steps,
    }


def _elapsed(snapshot: ProgressSnapshot, now: float | None) -> float:
    if snapshot.started_at is None:
        return 0.0
    return max((time.monotonic() if now is None else now) - snapshot.started_at, 0.0)


def progress_response(
    snapshot: ProgressSnapshot,
    *,
    skip_current_image: bool,
    image_format: str,
    now: float | None = None,
) -> dict[str, Any]:
    """`{progress, eta_relative, state, current_image, textinfo}`, every key always present.

    progress = 0.01 + job_no/passes + step share (capped at 1), A1111's formula over the running job's own
    passes; eta_relative = elapsed/progress - elapsed. Idle (job_count 0): zeros and no image.
    `now` is time.monotonic(), injectable for tests.
    """
    state = progress_state(snapshot)
    if snapshot.job_count == 0 or not snapshot.active:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                "textinfo": snapshot.textinfo}
    progress = snapshot.fraction()
    elapsed = _elapsed(snapshot, now)
    eta_relative = elapsed / progress - elapsed if progress > 0 else 0.0
    image = None
    if not skip_current_image and snapshot.current_image is not None:
        image = encode_image(snapshot.current_image, image_format, None)
    return {"progress": progress, "eta_relative": eta_relative, "state": state, "current_image": image,
            "textinfo": snapshot.textinfo}


def _passes_fraction(snapshot: ProgressSnapshot) -> float:
    """/internal/progress's fraction: A1111's formula without the 0.01 offset."""
    passes = max(snapshot.job_count - snapshot.queued, 1)
    value = snapshot.job_no / passes
    if snapshot.sampling_steps > 0:
        value += (1 / passes) * (snapshot.sampling_step / snapshot.sampling_steps)
    return min(value, 1.0)


def internal_progress_response(
    snapshot: ProgressSnapshot,
    *,
    id_task: str | None,
    id_live_preview: int,
    live_preview: bool,
    queued_ids: Sequence[str],
    completed_ids: Collection[str],
    preview_id: int,
    image_format: str = "png",
    live_previews_enable: bool = True,
    now: float | None = None,
) -> dict[str, Any]:
    """`POST /internal/progress` for one task id.

    `queued_ids` are the waiting task ids in queue order, `completed_ids` the recently finished ones, and
    `preview_id` the serial of the snapshot's current preview: the image is sent only when the client's
    `id_live_preview` differs from it, as data: URL (this route, unlike /progress, uses one).
    """
    active = id_task is not None and snapshot.job_id == id_task
    queued = id_task is not None and id_task in queued_ids
    completed = id_task is not None and id_task in completed_ids
    if not active:
        textinfo = "Waiting..."
        if queued:
            textinfo = f"In queue: {list(queued_ids).index(id_task) + 1}/{len(queued_ids)}"
        return {"active": False, "queued": queued, "completed": completed, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": textinfo}
    progress = _passes_fraction(snapshot)
    elapsed = _elapsed(snapshot, now)
    eta = elapsed / progress - elapsed if progress > 0 else None
    preview = None
    out_id = id_live_preview
    if live_previews_enable and live_preview and snapshot.current_image is not None and preview_id != id_live_preview:
        fmt = "jpeg" if image_format.lower() in ("jpg", "jpeg") else image_format.lower()
        preview = f"data:image/{fmt};base64," + encode_image(snapshot.current_image, image_format, None)
        out_id = preview_id
    return {"active": True, "queued": queued, "completed": completed, "progress": progress, "eta": eta,
            "live_preview": preview, "id_live_preview": out_id, "textinfo": snapshot.textinfo}
