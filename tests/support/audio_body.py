"""A post_call_audio body of any size, generated piece by piece (never whole in memory) and signed the same way."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.webhooks import SECRET

BLOCK = os.urandom(3 * 1024 * 256)  # 768 KiB, a multiple of 3 so block encodings concatenate
PIECE = 64 * 1024


@dataclass(frozen=True)
class AudioBody:
    conversation_id: str
    blocks: int  # of BLOCK: the MP3 is blocks x 768 KiB

    @property
    def audio_bytes(self) -> int:
        return self.blocks * len(BLOCK)

    def pieces(self) -> Iterator[bytes]:
        yield b'{"type":"post_call_audio","event_timestamp":1,"data":{"agent_id":"a","conversation_id":"'
        yield self.conversation_id.encode() + b'","full_audio":"'
        encoded = base64.b64encode(BLOCK)
        for _ in range(self.blocks):
            for start in range(0, len(encoded), PIECE):
                yield encoded[start : start + PIECE]
        yield b'"}}'

    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces())

    def signature(self, timestamp: int, secret: str = SECRET) -> str:
        mac = hmac.new(secret.encode(), f"{timestamp}.".encode(), hashlib.sha256)
        for piece in self.pieces():
            mac.update(piece)
        return f"t={timestamp},v0={mac.hexdigest()}"


def blocks_for(megabytes: int) -> int:
    """How many blocks make an MP3 of about `megabytes` MiB."""
    return max(1, round(megabytes * 2**20 / len(BLOCK)))
