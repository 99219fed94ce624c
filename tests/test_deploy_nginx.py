"""deploy/nginx/postcall.conf: well formed, and its limits in step with what `postcall serve` enforces itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from service.config import Settings
from service.web.server import HEAD_TIMEOUT_SECONDS, MAX_HEAD_BYTES

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "postcall.conf"
SIZES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def blocks() -> dict[str, dict[str, list[str]]]:
    """Each block (`server`, `location = /webhooks/elevenlabs`, …) as {directive: arguments}; checks that every
    statement ends in `;`, `{` or `}` and that the braces balance."""
    found: dict[str, dict[str, list[str]]] = {}
    stack: list[str] = []
    for raw in CONF.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            stack.append(" ".join(line[:-1].split()))
            found.setdefault(stack[-1], {})
        elif line == "}":
            assert stack, "a } closes nothing"
            stack.pop()
        else:
            assert stack and line.endswith(";"), f"not a statement in a block: {raw!r}"
            for statement in filter(None, (part.strip() for part in line.split(";"))):
                name, *arguments = shlex.split(statement)
                found[stack[-1]][name] = arguments
    assert not stack, f"unclosed: {stack}"
    return found


def size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", text.lower()).groups()  # type: ignore[union-attr]
    return int(number) * SIZES[unit]


def seconds(text: str) -> float:
    return float(re.fullmatch(r"(\d+)s?", text).group(1))  # type: ignore[union-attr]


def test_the_proxy_refuses_no_later_than_serve_would() -> None:
    server = blocks()["server"]
    count, each = server["large_client_header_buffers"]
    assert int(count) * size(each) <= MAX_HEAD_BYTES
    assert seconds(server["client_header_timeout"][0]) <= HEAD_TIMEOUT_SECONDS
    assert size(server["client_max_body_size"][0]) == Settings(_env_file=None).max_body_bytes  # type: ignore[call-arg]
    assert "client_body_timeout" in server


def test_the_webhook_body_streams_through_to_the_port_serve_listens_on() -> None:
    conf = blocks()
    webhook = conf["location = /webhooks/elevenlabs"]
    assert webhook["proxy_request_buffering"] == ["off"]
    assert conf["server"]["proxy_http_version"] == ["1.1"]  # without it nginx buffers a chunked body whole
    assert webhook["proxy_pass"] == ["http://postcall"]
    assert conf["upstream postcall"]["server"] == ["127.0.0.1:8000"]
    unit = (CONF.parents[1] / "systemd" / "postcall.service").read_text()
    assert "--host 127.0.0.1 --port 8000" in unit
    assert conf["location = /metrics"]["deny"] == ["all"]
