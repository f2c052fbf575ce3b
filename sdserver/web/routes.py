"""Routes serving the browser UI's files. Only named files are served: no path from a request reaches the disk."""

from __future__ import annotations

from importlib import resources
from typing import Callable

from fastapi import APIRouter
from fastapi.responses import Response

_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes:
    return resources.files("sdserver.web").joinpath("static", name).read_bytes()


def _serve(name: str) -> Callable[[], Response]:
    def serve() -> Response:
        return Response(_read(name), media_type=_FILES[name], headers={"Cache-Control": "no-cache"})

    serve.__name__ = "ui_" + name.replace(".", "_")
    return serve


def build_router() -> APIRouter:
    r = APIRouter(include_in_schema=False)
    r.add_api_route("/", _serve("index.html"), methods=["GET"])
    for name in _FILES:
        r.add_api_route(f"/ui/{name}", _serve(name), methods=["GET"])
    return r
