"""`postcall simulate`: the fake platform on a port, with a seeded data set, optionally sending its webhooks.

With a webhook URL, the fake workspace's post-call webhook points there, so `postcall doctor` run against the
simulator (POSTCALL_PUBLIC_URL set to that URL's base) checks a whole local setup."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from service.testing.dataset import seed_conversations
from service.testing.platform import FakePlatform, FakeWebhook
from service.testing.webhooks import Faults, WebhookSender

__all__ = ["Faults", "Simulation", "build_platform", "run"]


@dataclass(frozen=True)
class Simulation:
    host: str = "127.0.0.1"
    port: int = 8700
    conversations: int = 200
    agents: int = 2
    days: int = 3
    processing_share: float = 0.05
    failed_share: float = 0.05
    seed: int = 1
    api_key: str = "sim-api-key"
    latency: float = 0.0
    webhook_url: str | None = None
    webhook_secret: str | None = None
    faults: Faults = field(default_factory=lambda: Faults(drop=0.3, duplicate=0.1, reorder=0.2))
    audio_webhooks: bool = False


def build_platform(sim: Simulation, now: int) -> FakePlatform:
    agent_ids = tuple(f"agent_sim_{i + 1}" for i in range(sim.agents))
    conversations = seed_conversations(
        sim.conversations,
        agent_ids,
        now=now,
        spread_seconds=sim.days * 86400,
        processing_share=sim.processing_share,
        failed_share=sim.failed_share,
        seed=sim.seed,
    )
    webhooks = [FakeWebhook(webhook_url=sim.webhook_url)] if sim.webhook_url else [FakeWebhook()]
    # A long-running simulator must not keep every call it answered.
    return FakePlatform(
        api_key=sim.api_key,
        conversations=conversations,
        agents=agent_ids,
        latency=sim.latency,
        log_calls=False,
        webhooks=webhooks,
    )


def run(sim: Simulation, say: Callable[[str], None], stop: Callable[[], bool] = lambda: False) -> None:
    """Serve until interrupted (or `stop()` is true), after sending the webhooks if a URL was given."""
    platform = build_platform(sim, int(time.time()))
    with platform.serve(sim.host, sim.port) as base_url:
        agents = ", ".join(platform.agent_ids)
        say(f"fake ElevenLabs API on {base_url}: {sim.conversations} conversations, agents {agents}")
        env = f"POSTCALL_ELEVENLABS_BASE_URL={base_url} POSTCALL_ELEVENLABS_API_KEY={sim.api_key}"
        say(f"try: {env} postcall reconcile")
        if sim.webhook_url:
            say(f"or: {env} POSTCALL_PUBLIC_URL={_base(sim.webhook_url)} postcall doctor")
        if sim.webhook_url:
            _send_webhooks(platform, sim, say)
        say("serving until interrupted (Ctrl-C)")
        try:
            while not stop():
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass


def _send_webhooks(platform: FakePlatform, sim: Simulation, say: Callable[[str], None]) -> None:
    assert sim.webhook_url is not None and sim.webhook_secret is not None
    sender = WebhookSender(sim.webhook_url, sim.webhook_secret)
    try:
        plan, answers = sender.deliver(platform.events(audio=sim.audio_webhooks), sim.faults)
    except httpx.HTTPError as exc:
        say(f"could not deliver webhooks to {sim.webhook_url}: {type(exc).__name__}: {exc}")
        return
    statuses = Counter(answer.status for answer in answers)
    summary = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    say(
        f"webhooks: {len(answers)} sent to {sim.webhook_url} ({summary}); {len(plan.dropped)} dropped on purpose — "
        "postcall reconcile fills that gap"
    )


def _base(webhook_url: str) -> str:
    """The service's base URL, from its webhook URL (…/webhooks/elevenlabs)."""
    suffix = "/webhooks/elevenlabs"
    return webhook_url[: -len(suffix)] if webhook_url.endswith(suffix) else webhook_url
