"""A real S3-compatible server for the `s3` tests: moto's, over HTTP on a loopback port, one per test session.

Tests reach it through the app's own client (service.storage.s3.make_client), never a mocked one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

from tests.support.live import free_port

# moto accepts any credentials; these are set so the client signs requests, and so a test can look for them in logs.
ACCESS_KEY = "AKIAPOSTCALLTESTKEY01"
SECRET_KEY = "postcall-test-secret-key-never-logged-0123456789"


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_environment(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The standard AWS_* variables the store's client reads."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        **(overrides or {}),
    }


def set_aws_environment() -> None:
    for name, value in aws_environment().items():
        os.environ[name] = value
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)


def new_bucket_name() -> str:
    return f"postcall-{uuid.uuid4().hex[:12]}"
