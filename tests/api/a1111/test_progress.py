import base64
import io

import pytest
from PIL import Image

from sdserver.api.a1111.progress import internal_progress_response, progress_response
from sdserver.api.a1111.schemas import InternalProgressResponse, ProgressResponse
from sdserver.jobs.progress import ProgressSnapshot

STATE_KEYS = {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
              "sampling_step", "sampling_steps"}


def _running(**kwargs):
    base = dict(job="scripts_txt2img", job_id="task(txt2img-ABCDEFG)", job_count=2, job_no=1, sampling_step=5,
                sampling_steps=10, job_timestamp="20240801120000", started_at=100.0,
                current_image=Image.new("RGB", (8, 8), (9, 9, 9)), textinfo=None)
    base.update(kwargs)
    return ProgressSnapshot(**base)


def test_idle_progress_has_every_key():
    body = progress_response(ProgressSnapshot(), skip_current_image=False, image_format="png")
    ProgressResponse.model_validate(body)
    assert body["progress"] == 0 and body["eta_relative"] == 0 and body["current_image"] is None
    assert set(body) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert set(body["state"]) == STATE_KEYS and body["state"]["job_count"] == 0


def test_running_progress_formula_and_eta():
    body = progress_response(_running(), skip_current_image=False, image_format="png", now=130.0)
    expected = 0.01 + 1 / 2 + (1 / 2) * (5 / 10)
    assert body["progress"] == pytest.approx(expected)
    assert body["eta_relative"] == pytest.approx(30.0 / expected - 30.0)
    assert body["state"]["job"] == "scripts_txt2img" and body["state"]["job_no"] == 1
    img = Image.open(io.BytesIO(base64.b64decode(body["current_image"])))
    assert img.size == (8, 8) and img.format == "PNG"


def test_queued_jobs_count_but_do_not_dilute_the_running_pass():
    body = progress_response(_running(job_count=5, queued=3), skip_current_image=True, image_format="png", now=130)
    assert body["state"]["job_count"] == 5
    assert body["progress"] == pytest.approx(0.01 + 1 / 2 + 0.25)
    assert body["current_image"] is None


def test_progress_capped_at_one():
    body = progress_response(_running(job_no=2, sampling_step=10), skip_current_image=True, image_format="png",
                             now=101)
    assert body["progress"] == 1.0


def test_preview_format_follows_the_option():
    body = progress_response(_running(), skip_current_image=False, image_format="jpeg", now=101)
    assert Image.open(io.BytesIO(base64.b64decode(body["current_image"]))).format == "JPEG"


def test_internal_progress_active_task():
    snap = _running()
    body = internal_progress_response(snap, id_task="task(txt2img-ABCDEFG)", id_live_preview=-1, live_preview=True,
                                      queued_ids=[], completed_ids=set(), preview_id=3, now=130.0)
    InternalProgressResponse.model_validate(body)
    assert body["active"] is True and body["progress"] == pytest.approx(0.75)
    assert body["eta"] == pytest.approx(30 / 0.75 - 30)
    assert body["live_preview"].startswith("data:image/png;base64,") and body["id_live_preview"] == 3
    same = internal_progress_response(snap, id_task="task(txt2img-ABCDEFG)", id_live_preview=3, live_preview=True,
                                      queued_ids=[], completed_ids=set(), preview_id=3, now=130.0)
    assert same["live_preview"] is None and same["id_live_preview"] == 3


def test_internal_progress_queued_and_completed():
    snap = _running()
    body = internal_progress_response(snap, id_task="b", id_live_preview=-1, live_preview=True,
                                      queued_ids=["a", "b", "c"], completed_ids=set(), preview_id=0)
    assert body["active"] is False and body["queued"] is True and body["textinfo"] == "In queue: 2/3"
    done = internal_progress_response(snap, id_task="z", id_live_preview=-1, live_preview=True,
                                      queued_ids=[], completed_ids={"z"}, preview_id=0)
    assert done["completed"] is True and done["textinfo"] == "Waiting..."
