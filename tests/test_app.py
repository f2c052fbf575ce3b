"""create_app and its lifespan: state on app.state, the startup model, shutdown, nothing heavy at import."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.api.a1111.options import Options
from sdserver.app import ServerControl, create_app, preview_period
from sdserver.cli import main
from sdserver.engine.types import CheckpointInfo, GeneratedImage, GenerationResult
from sdserver.jobs import JobState
from sdserver.settings import Settings

ALPHA = CheckpointInfo(title="alpha.safetensors [aaaaaaaaaa]", model_name="alpha", name="alpha.safetensors",
                       filename="/m/alpha.safetensors", hash="aaaaaaaaaa", sha256="a" * 64)
BETA = CheckpointInfo(title="beta.safetensors [bbbbbbbbbb]", model_name="beta", name="beta.safetensors",
                      filename="/m/beta.safetensors", hash="bbbbbbbbbb", sha256="b" * 64)


class MiniEngine:
    def __init__(self) -> None:
        self.loaded = ALPHA
        self.loads: list[str] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, request, control):
        control.begin_pass(0, 1, request.sampling.steps)
        self.started.set()
        self.release.wait(5)
        control.step(0, None)
        image = GeneratedImage(Image.new("RGB", (8, 8)), request.seeds.seed, 0, request.prompt, "")
        return GenerationResult(images=(image,), model_name=self.loaded.model_name, model_hash=self.loaded.hash)

    def checkpoints(self):
        return [ALPHA, BETA]

    def refresh_checkpoints(self):
        pass

    def current_checkpoint(self):
        return self.loaded

    def load_checkpoint(self, name):
        for c in (ALPHA, BETA):
            if name in (c.title, c.name, c.model_name):
                self.loads.append(c.title)
                self.loaded = c
                return c
        from sdserver.errors import ModelNotFound

        raise ModelNotFound(name)

    def unload(self):
        pass

    def reload(self):
        pass

    def default_size(self):
        return (64, 64)


def test_importing_and_creating_the_app_does_not_import_torch():
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from sdserver.app import create_app\n"
        "from sdserver.settings import Settings\n"
        "import sdserver.cli\n"
        "create_app(Settings(data_dir=Path('.')))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not any(t.name.startswith('sdserver-worker') for t in __import__('threading').enumerate())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=60)


def test_lifespan_builds_state_and_names_the_loaded_model(tmp_path):
    engine = MiniEngine()
    app = create_app(Settings(data_dir=tmp_path), engine=engine)
    with TestClient(app) as client:
        assert app.state.engine is engine
        assert isinstance(app.state.options, Options)
        assert app.state.queue.accepting
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == ALPHA.title
    assert not app.state.queue.accepting


def test_startup_loads_the_checkpoint_saved_in_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sd_model_checkpoint": BETA.title}))
    engine = MiniEngine()
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=engine)) as client:
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == BETA.title
    assert engine.loads == [BETA.title]


@pytest.mark.parametrize("flag", [{"ckpt": Path("/m/alpha.safetensors")}, {"skip_load_model_at_start": True}])
def test_startup_respects_ckpt_and_skip_load(tmp_path, flag):
    (tmp_path / "config.json").write_text(json.dumps({"sd_model_checkpoint": BETA.title}))
    engine = MiniEngine()
    with TestClient(create_app(Settings(data_dir=tmp_path, **flag), engine=engine)) as client:
        client.get("/sdapi/v1/progress")
        queue = client.app.state.queue
        # The start-up sync job may still be queued or running under load: wait for it whichever it is.
        startup = (queue.completed_ids() or queue.pending_ids())[0]
        queue.wait_sync(startup, 5)
    assert engine.loads == []


def test_a_missing_saved_checkpoint_does_not_stop_startup(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sd_model_checkpoint": "gone.safetensors"}))
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=MiniEngine())) as client:
        assert client.get("/sdserver/v1/health").status_code == 200


def test_shutdown_cancels_queued_jobs_and_finishes_the_running_one(tmp_path):
    engine = MiniEngine()
    app = create_app(Settings(data_dir=tmp_path, shutdown_grace=5), engine=engine)
    client = TestClient(app)
    client.__enter__()
    running = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 1}).json()["id"]
    assert engine.started.wait(5)
    queued = client.post("/sdserver/v1/jobs/txt2img", json={"steps": 1}).json()["id"]
    threading.Timer(0.1, engine.release.set).start()
    client.__exit__(None, None, None)
    assert app.state.queue.get(queued).state is JobState.CANCELLED
    assert app.state.queue.get(running).state is JobState.SUCCEEDED


def test_the_engine_follows_sd_checkpoints_limit_from_startup_and_options_posts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sd_checkpoints_limit": 2}))
    engine = MiniEngine()
    limits: list[int] = []
    engine.set_checkpoints_limit = limits.append
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=engine)) as client:
        assert limits == [2]
        assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 3}).status_code == 200
        assert limits == [2, 3]


def test_preview_period_follows_the_options(tmp_path):
    options = Options(None)
    assert preview_period(options) == options.get("show_progress_every_n_steps")
    options.update({"live_previews_enable": False})
    assert preview_period(options) == 0


def test_server_control_defaults_are_callables():
    control = ServerControl()
    assert callable(control.stop) and callable(control.kill)


def test_main_sets_offline_mode_before_anything_else(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("COMMANDLINE_ARGS", "")
    with pytest.raises(SystemExit):
        main(["--precision", "not-a-precision"])  # fails in parsing, after the environment is set
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
