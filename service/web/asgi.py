"""The ASGI entry point uvicorn imports in each worker: `service.web.asgi:build` with `--factory`."""

from __future__ import annotations

from starlette.applications import Starlette

from service.config import load_settings
from service.web.app import create_app


def build() -> Starlette:
    return create_app(load_settings())
