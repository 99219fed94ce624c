"""A fake ElevenLabs platform for tests, benchmarks and `postcall simulate` (see platform.py for its API)."""

from service.testing.dataset import FakeConversation, new_conversation_id, seed_conversations
from service.testing.platform import Call, FakePlatform, livekit_token
from service.testing.webhooks import Faults, WebhookSender, plan_deliveries

__all__ = [
    "Call",
    "FakeConversation",
    "FakePlatform",
    "Faults",
    "WebhookSender",
    "livekit_token",
    "new_conversation_id",
    "plan_deliveries",
    "seed_conversations",
]
