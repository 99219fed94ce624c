"""`postcall send-test-webhook`: sign a sample event the way ElevenLabs does and post it to a running postcall.

The end-to-end check of a deployment: it exercises the proxy, TLS, the signature secret, the database and (for
`audio`) the data dir, and its answer is exactly what ElevenLabs would get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from service.testing.samples import SampleType, new_sample_id, sample_event
from service.webhook.signature import sign

DEFAULT_URL = "http://127.0.0.1:8000/webhooks/elevenlabs"
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class WebhookAnswer:
    conversation_id: str
    status_code: int
    body: str

    @property
    def ok(self) -> bool:
        return self.status_code == 200


def signed_request(kind: SampleType, secret: bytes, now: int) -> tuple[str, bytes, dict[str, str]]:
    """A fresh sample: its conversation id, the exact body bytes and the headers that sign them."""
    conversation_id = new_sample_id()
    body = json.dumps(sample_event(kind, conversation_id, now)).encode()
    headers = {
        "ElevenLabs-Signature": sign(body, secret, now),
        "Content-Type": "application/json",
        "User-Agent": "postcall-send-test-webhook",
    }
    return conversation_id, body, headers


def send_test_webhook(client: httpx.Client, url: str, kind: SampleType, secret: bytes, now: int) -> WebhookAnswer:
    """Post one signed sample; transport errors (refused, timeout, TLS) propagate as httpx.HTTPError."""
    conversation_id, body, headers = signed_request(kind, secret, now)
    response = client.post(url, content=body, headers=headers)
    return WebhookAnswer(conversation_id, response.status_code, response.text)
