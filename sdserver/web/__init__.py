"""web: the small static browser UI at `/` (plain HTML + JS, no build step); it calls the public API."""

from sdserver.web.routes import build_router

__all__ = ["build_router"]
