"""What `postcall doctor` concludes from what its probes found, as lines for a person. Pure.

Each line is ✓ (fine), ✗ (broken: says what to do) or ⚠ (works, but worth changing). The command exits 1 when any
line is ✗. The post-call webhook's checks follow ElevenLabs' documented behaviour: it verifies nothing but HMAC
signatures here; a disabled or auto-disabled webhook sends nothing; retries are off unless enabled (then 5xx, 408
and 429 are retried up to 5 times over about 40 minutes), and only transcripts are ever retried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from service.reconcile.upstream import PostCallWebhook, auto_disabled, disabled, failed_recently

WEBHOOK_PATH = "/webhooks/elevenlabs"
DEFAULT_PORTS = {"http": 80, "https": 443}
WEBHOOK = "post-call webhook"


class State(StrEnum):
    OK = "✓"
    WARN = "⚠"
    FAIL = "✗"


@dataclass(frozen=True)
class Line:
    state: State
    check: str
    text: str

    def __str__(self) -> str:
        return f"{self.state} {self.check}: {self.text}"


def ok(check: str, text: str) -> Line:
    return Line(State.OK, check, text)


def warn(check: str, text: str) -> Line:
    return Line(State.WARN, check, text)


def fail(check: str, text: str) -> Line:
    return Line(State.FAIL, check, text)


def exit_status(lines: Iterable[Line]) -> int:
    return 1 if any(line.state is State.FAIL for line in lines) else 0


def webhook_url_for(public_url: str) -> str:
    return public_url.rstrip("/") + WEBHOOK_PATH


def same_url(a: str, b: str) -> bool:
    """Whether two http(s) URLs name the same place: scheme and host in any case, a default port or not, a trailing
    slash or not."""
    one, two = urlsplit(a.strip()), urlsplit(b.strip())
    try:
        ports = (one.port or DEFAULT_PORTS.get(one.scheme.lower()), two.port or DEFAULT_PORTS.get(two.scheme.lower()))
    except ValueError:  # a port that is not a number
        return False
    return (
        one.scheme.lower() == two.scheme.lower()
        and (one.hostname or "") == (two.hostname or "")
        and ports[0] == ports[1]
        and one.path.rstrip("/") == two.path.rstrip("/")
        and one.query == two.query
    )


def webhook_lines(webhook: PostCallWebhook, public_url: str | None, now: int) -> list[Line]:
    """The post-call webhook's ✗ lines (or one ✓), then its ⚠ lines."""
    failures = [*_where_it_posts(webhook, public_url), *_how_it_signs(webhook), *_whether_it_sends(webhook)]
    lines = failures or [ok(WEBHOOK, f"{webhook.url} (HMAC, enabled)")]
    return lines + _advice(webhook, public_url, now)


def _where_it_posts(webhook: PostCallWebhook, public_url: str | None) -> list[Line]:
    url = webhook.url or ""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        return [fail(WEBHOOK, f"its URL {url!r} is not http or https: point it at this service's {WEBHOOK_PATH}")]
    if public_url is not None and not same_url(url, webhook_url_for(public_url)):
        return [
            fail(
                WEBHOOK,
                f"it posts to {url}, not to {webhook_url_for(public_url)}: change the webhook's URL in ElevenLabs "
                "(or POSTCALL_PUBLIC_URL, if that is what is wrong)",
            )
        ]
    return []


def _how_it_signs(webhook: PostCallWebhook) -> list[Line]:
    if webhook.auth_type == "hmac":
        return []
    return [
        fail(
            WEBHOOK,
            f"it authenticates with {webhook.auth_type or 'nothing ElevenLabs names'}, not HMAC: postcall verifies "
            "ElevenLabs-Signature; create an HMAC webhook and put its secret in POSTCALL_WEBHOOK_SECRETS",
        )
    ]


def _whether_it_sends(webhook: PostCallWebhook) -> list[Line]:
    return [fail(WEBHOOK, problem) for problem in (disabled(webhook), auto_disabled(webhook)) if problem is not None]


def _advice(webhook: PostCallWebhook, public_url: str | None, now: int) -> list[Line]:
    lines = []
    if public_url is None:
        lines.append(warn(WEBHOOK, f"set POSTCALL_PUBLIC_URL to check that it posts here (it posts to {webhook.url})"))
    recent = failed_recently(webhook, now)
    if recent is not None:
        lines.append(warn(WEBHOOK, recent))
    if webhook.sends_transcripts is False:
        lines.append(
            warn(
                WEBHOOK,
                f"ElevenLabs sends it no transcripts (events: {', '.join(webhook.events or ()) or 'none'}): add the "
                "transcript event in the Agents Platform settings, or only the reconciler will store conversations",
            )
        )
    if webhook.retry_enabled is False:
        lines.append(
            warn(
                WEBHOOK,
                "retries are off: ElevenLabs sends each transcript once; enable retries on the webhook (5xx, 408 "
                "and 429 are then retried up to 5 times over about 40 minutes)",
            )
        )
    return lines
