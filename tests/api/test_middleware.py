"""CORS, GZip, X-Process-Time, body limit, --api-log, the last-resort 500, --subpath."""

import logging

from sdserver.settings import Limits


def test_process_time_header_on_every_response(client):
    for r in (client.get("/sdapi/v1/options"), client.get("/nope")):
        assert float(r.headers["X-Process-Time"]) >= 0


def test_gzip_above_1000_bytes(client):
    r = client.get("/sdapi/v1/options", headers={"Accept-Encoding": "gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    small = client.get("/sdserver/v1/health", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers


def test_cors_off_by_default(client):
    r = client.options("/sdapi/v1/txt2img", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_cors_allowed_origins_and_regex(make_client):
    client = make_client(cors_allow_origins=("http://a.example",), cors_allow_origins_regex=r"https://.*\.b\.example")
    for origin in ("http://a.example", "https://x.b.example"):
        r = client.options("/sdapi/v1/txt2img", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert r.headers["access-control-allow-credentials"] == "true"
    r = client.get("/sdapi/v1/options", headers={"Origin": "http://c.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_preflight_is_answered_before_auth(make_client):
    from sdserver.settings import Credential

    client = make_client(api_auth=(Credential("u", "p"),), cors_allow_origins=("http://a.example",))
    r = client.options("/sdapi/v1/txt2img", headers={"Origin": "http://a.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200


def test_oversized_body_is_413(make_client):
    client = make_client(limits=Limits(max_body_bytes=1000))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"]

    def chunks():
        for _ in range(5):
            yield b"x" * 400

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_unexpected_errors_answer_500_with_the_class_only(make_client, fake_engine, caplog):
    engine = fake_engine()

    def broken():
        raise RuntimeError("internal detail /secret/path")

    engine.checkpoints = broken
    client = make_client(engine)
    with caplog.at_level(logging.ERROR):
        r = client.get("/sdapi/v1/sd-models")
    assert r.status_code == 500
    assert r.json()["error"] == "RuntimeError"
    assert set(r.json()) == {"error", "detail", "body", "errors"}
    assert "/secret/path" not in r.text and "Traceback" not in r.text
    assert "/secret/path" in caplog.text  # the server log keeps the details


def test_api_log_line_has_no_body_query_or_credentials(make_client, caplog):
    from sdserver.settings import Credential

    client = make_client(api_log=True, api_auth=(Credential("u", "hunter2"),))
    with caplog.at_level(logging.INFO, logger="sdserver.api"):
        client.post("/sdapi/v1/txt2img?token=abc", json={"prompt": "very private prompt", "steps": 1},
                    auth=("u", "hunter2"))
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "sdserver.api"]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("API ") and " 200 http/1.1 POST /sdapi/v1/txt2img testclient " in line
    assert "private" not in line and "hunter2" not in line and "token" not in line


def test_subpath_routes_prefixed_paths_and_keeps_auth(tmp_path, fake_engine):
    from fastapi.testclient import TestClient

    from sdserver.app import create_app
    from sdserver.settings import Credential, Settings

    settings = Settings(data_dir=tmp_path, subpath="/sd", api_auth=(Credential("u", "p"),))
    with TestClient(create_app(settings, engine=fake_engine()), root_path="/sd") as client:
        assert client.get("/sd/sdapi/v1/options", auth=("u", "p")).status_code == 200
        assert client.get("/sd/sdapi/v1/options").status_code == 401
        assert client.get("/sd/sdserver/v1/health").status_code == 200
        assert "/sd/openapi.json" in client.get("/sd/docs", auth=("u", "p")).text
