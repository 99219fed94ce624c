"""Deliver the fake platform's webhooks to a URL, signed as ElevenLabs signs them, with a chosen share of faults.

`plan_deliveries` is pure: it decides, from a seed, which events are dropped (never sent — the gap the reconciler
must fill), which are sent twice, and which change places with a neighbour. `WebhookSender` signs and posts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from service.webhook.signature import sign


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int = 1


@dataclass
class DeliveryPlan:
    sends: list[dict[str, Any]]  # in the order they will be posted
    dropped: list[dict[str, Any]] = field(default_factory=list)


def plan_deliveries(events: Sequence[dict[str, Any]], faults: Faults) -> DeliveryPlan:
    rng = random.Random(faults.seed)
    plan = DeliveryPlan(sends=[])
    for event in events:
        if rng.random() < faults.drop:
            plan.dropped.append(event)
            continue
        plan.sends.append(event)
        if rng.random() < faults.duplicate:
            plan.sends.append(event)
    for i in range(len(plan.sends) - 1):
        if rng.random() < faults.reorder:
            plan.sends[i], plan.sends[i + 1] = plan.sends[i + 1], plan.sends[i]
    return plan


@dataclass(frozen=True)
class Delivered:
    conversation_id: str | None
    type: str
    status: int
    answer: str


class WebhookSender:
    """Posts events to `url` with an `ElevenLabs-Signature` made with `secret`."""

    def __init__(self, url: str, secret: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self.secret = secret.encode()
        self.timeout = timeout

    def send(self, event: dict[str, Any], client: httpx.Client | None = None) -> Delivered:
        body = orjson.dumps(event)
        signature = sign(body, self.secret, int(time.time()))
        headers = {"ElevenLabs-Signature": signature, "Content-Type": "application/json"}
        if client is None:
            response = httpx.post(self.url, content=body, headers=headers, timeout=self.timeout)
        else:
            response = client.post(self.url, content=body, headers=headers)
        data = event.get("data") or {}
        return Delivered(data.get("conversation_id"), str(event.get("type")), response.status_code, response.text)

    def deliver(
        self, events: Sequence[dict[str, Any]], faults: Faults | None = None
    ) -> tuple[DeliveryPlan, list[Delivered]]:
        """Send what the plan keeps, in its order; returns the plan and each answer."""
        plan = plan_deliveries(events, faults or Faults())
        with httpx.Client(timeout=self.timeout) as client:
            answers = [self.send(event, client) for event in plan.sends]
        return plan, answers
