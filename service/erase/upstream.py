"""`postcall erase --upstream`: the same conversations deleted at ElevenLabs (`DELETE /v1/convai/conversations/{id}`).

Each failure is reported as it happens and the rest go on: one refusal must not leave the other conversations
undeleted. ElevenLabs answering 404 means it holds no such conversation (deleted before, or never there): as good as
deleted. The client retries 429, 5xx and timeouts and bounds how many calls are in flight (elevenlabs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from service.elevenlabs import ElevenLabsClient, ElevenLabsError, NotFound

log = logging.getLogger("postcall.erase")


@dataclass
class UpstreamReport:
    deleted: int = 0
    absent: int = 0  # ElevenLabs answered 404: nothing left to delete there
    failed: list[tuple[str, str]] = field(default_factory=list)  # (conversation_id, why)


async def delete_at_elevenlabs(
    client: ElevenLabsClient,
    ids: Sequence[str],
    report: UpstreamReport,
    on_failure: Callable[[str, str], None] = lambda conversation_id, why: None,
) -> None:
    """Ask ElevenLabs to delete each of `ids`; every outcome goes into `report`, each failure to `on_failure` too."""

    async def delete(conversation_id: str) -> None:
        try:
            await client.delete_conversation(conversation_id)
        except NotFound:
            report.absent += 1
            return
        except ElevenLabsError as exc:
            report.failed.append((conversation_id, str(exc)))
            log.warning("ElevenLabs did not delete a conversation: %s", exc, extra={"conversation_id": conversation_id})
            on_failure(conversation_id, str(exc))
            return
        report.deleted += 1

    async with anyio.create_task_group() as group:
        for conversation_id in ids:
            group.start_soon(delete, conversation_id)
