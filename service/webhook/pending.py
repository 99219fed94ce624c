"""What webhook bodies whose signature is not yet checked may hold, all of them together.

Until its signature is checked a body is anybody's: without a bound, a few forged bodies of 256 MiB fill the
memory or the disk, and nothing costs the sender more than it costs us. Each body being read takes a `Hold` on
the process's `PendingBudget` for what it keeps: bytes in memory (a small body, the batch about to be hashed) and
bytes in the data dir (a large body waiting for its check). The two budgets answer differently:
- memory past its budget is not refused, the body goes to disk instead, so memory stays flat whatever arrives;
- disk past its budget (POSTCALL_MAX_PENDING_BYTES) is refused: the request is answered 503 at once, before more
  of it is read, and ElevenLabs' retry (or the reconciler) brings a genuine delivery back later. A body that
  declares its length is refused before any of it is read when that length does not fit in what is free.
A body holds what has arrived of it, not what it declares: reserving the declared length up front would let two
senders declaring 256 MiB and trickling 64 KiB/s (the slowest pace allowed) hold the whole budget for an hour,
refusing every genuine audio body meanwhile; this way, holding the budget costs a sender as many bytes as it holds.
A hold is let go the moment the signature is checked or the body is refused. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import threading

# Small bodies wait for their check in memory (the fast path) while they fit in this; a flood of them spills to disk
# beyond it. 64 MiB holds 64 bodies at the 1 MiB small-body limit, far more than ElevenLabs sends at once.
MEMORY_BYTES = 64 << 20


class PendingFull(Exception):
    """Bodies not yet verified already hold so much disk that this one would pass POSTCALL_MAX_PENDING_BYTES."""


class PendingBudget:
    """The bytes that bodies not yet verified hold, in memory and on disk; safe to share between threads."""

    def __init__(self, disk_bytes: int, memory_bytes: int = MEMORY_BYTES) -> None:
        self.disk_limit = disk_bytes
        self.memory_limit = memory_bytes
        self.disk = 0
        self.memory = 0
        self._lock = threading.Lock()

    def hold(self) -> Hold:
        return Hold(self)

    def disk_free(self) -> int:
        with self._lock:
            return self.disk_limit - self.disk

    def _change(self, disk: int = 0, memory: int = 0) -> bool:
        """Apply both changes, or neither when a growth would pass its limit (a shrink always applies)."""
        with self._lock:
            if disk > 0 and self.disk + disk > self.disk_limit:
                return False
            if memory > 0 and self.memory + memory > self.memory_limit:
                return False
            self.disk += disk
            self.memory += memory
            return True


class Hold:
    """One body's share of the budget. Let it go with `release()` (it is safe to call more than once)."""

    def __init__(self, budget: PendingBudget) -> None:
        self._budget = budget
        self.disk = 0
        self.memory = 0

    def admit(self, size: int) -> None:
        """Raise PendingFull if a body of `size` bytes would not fit in the disk free now (what this hold has is
        free to it). Nothing is reserved: the body then holds what arrives of it, `cover_disk` as it grows."""
        if size - self.disk > self._budget.disk_free():
            raise PendingFull()

    def cover_disk(self, size: int) -> None:
        """Hold at least `size` bytes of disk; raise PendingFull if that would pass the budget."""
        if size > self.disk:
            if not self._budget._change(disk=size - self.disk):
                raise PendingFull()
            self.disk = size

    def try_memory(self, size: int) -> bool:
        """Hold exactly `size` bytes of memory if the budget allows it; else hold what was held and say False."""
        if not self._budget._change(memory=size - self.memory):
            return False
        self.memory = size
        return True

    def release(self) -> None:
        self._budget._change(disk=-self.disk, memory=-self.memory)
        self.disk = self.memory = 0
