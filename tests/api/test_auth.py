"""--api-auth: Basic auth on every route in the OpenAPI spec, the docs and the UI; /health open."""

import re

import pytest

from sdserver.api.auth import credentials_match, parse_basic
from sdserver.settings import Credential

CREDS = (Credential("alice", "pw-one"), Credential("bob", "pw:two"))


@pytest.fixture
def secured(make_client):
    return make_client(api_auth=CREDS, api_server_stop=True)


def every_route(client):
    """(method, concrete path) for every operation in the OpenAPI spec, plus the pages outside it."""
    routes = []
    for path, operations in client.app.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "some-id", path)
        routes += [(method.upper(), concrete) for method in operations]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/"), ("GET", "/ui/app.js")]
    return routes


# Routes whose success would end the test process's server or be slow; they are still checked for 401.
_SKIP_WITH_GOOD_CREDENTIALS = {"/sdapi/v1/server-kill", "/sdapi/v1/server-stop"}


def test_every_route_needs_credentials(secured):
    routes = every_route(secured)
    assert len(routes) > 50
    for method, path in routes:
        if path == "/sdserver/v1/health" or path == "/login":
            continue
        r = secured.request(method, path)
        assert r.status_code == 401, (method, path)
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert r.json()["detail"] == "Not authenticated"
        wrong = secured.request(method, path, auth=("alice", "wrong"))
        assert wrong.status_code == 401 and wrong.json()["detail"] == "Incorrect username or password"


def test_every_route_opens_with_good_credentials(secured):
    for method, path in every_route(secured):
        if path in _SKIP_WITH_GOOD_CREDENTIALS or path.endswith("/events"):
            continue
        kwargs = {"json": {}} if method in ("POST", "PUT") else {}
        r = secured.request(method, path, auth=("bob", "pw:two"), **kwargs)
        assert r.status_code != 401, (method, path, r.text)


def test_health_stays_open(secured):
    assert secured.get("/sdserver/v1/health").json() == {"status": "ok"}


def test_empty_authorization_header_is_fine_with_auth_off(client):
    assert client.get("/sdapi/v1/options", headers={"Authorization": ""}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}, headers={"Authorization": ""}).status_code == 200


def test_empty_authorization_header_is_refused_with_auth_on(secured):
    assert secured.get("/sdapi/v1/options", headers={"Authorization": ""}).status_code == 401


def test_login_sets_a_session_cookie(secured):
    assert secured.get("/login_check").status_code == 401
    r = secured.post("/login", data={"username": "alice", "password": "wrong"})
    assert r.status_code == 400
    r = secured.post("/login", data={"username": "alice", "password": "pw-one"})
    assert r.status_code == 200 and r.json() == {"success": True}
    # TestClient keeps the cookie: the session now opens the API without a Basic header.
    assert secured.get("/login_check").status_code == 200
    assert secured.get("/sdapi/v1/options").status_code == 200


def test_login_without_auth(client):
    assert client.post("/login", data={"username": "x", "password": "y"}).json() == {"success": True}
    assert client.get("/login_check").status_code == 200


def test_forged_cookie_is_refused(secured):
    r = secured.get("/sdapi/v1/options", headers={"Cookie": "access-token=forged"})
    assert r.status_code == 401


def test_credentials_never_appear_in_responses_or_errors(secured):
    r = secured.get("/sdapi/v1/cmd-flags", auth=("alice", "pw-one"))
    assert "pw-one" not in r.text and "pw:two" not in r.text
    r = secured.get("/sdapi/v1/options", auth=("alice", "pw-wrong"))
    assert "pw-" not in r.text


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", None),
        ("Basic YWxpY2U6cHctb25l", ("alice", "pw-one")),
        ("basic YWxpY2U6cHctb25l", ("alice", "pw-one")),
        ("Basic !!!", ("", "")),
    ],
)
def test_parse_basic(header, expected):
    assert parse_basic(header) == expected


def test_credentials_match_needs_both_parts_of_the_same_pair():
    assert credentials_match(CREDS, "bob", "pw:two")
    assert not credentials_match(CREDS, "alice", "pw:two")
    assert not credentials_match(CREDS, "", "")
    assert not credentials_match((), "alice", "pw-one")
