"""When to try a failed delivery again, and when to give up on it. Pure.

About 5 s, 30 s, 2 min, 10 min, 30 min and 1 h after each failure, then every 2 h, each wait jittered by up to
±20 % (so the deliveries a sink outage failed together do not all come back in the same second), until 3 days
after the first attempt: a failure then makes the delivery dead (kept, visible in `GET /v1/forward`, and
replayable). The last try is made at the deadline itself rather than skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

DELAYS = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
THEN_EVERY = 7200.0
GIVE_UP_AFTER = 3 * 86400.0
JITTER = 0.2


@dataclass(frozen=True)
class RetrySchedule:
    delays: tuple[float, ...] = DELAYS
    then_every: float = THEN_EVERY
    give_up_after: float = GIVE_UP_AFTER
    jitter: float = JITTER
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def wait(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure (1 = the first), jittered."""
        base = self.delays[failures - 1] if failures <= len(self.delays) else self.then_every
        return base * (1 + self.jitter * (2 * self.rng.random() - 1))

    def next_attempt(self, failures: int, first_attempt: datetime, now: datetime) -> datetime | None:
        """When to try again after the `failures`-th failure at `now`; None: give up (dead)."""
        deadline = first_attempt + timedelta(seconds=self.give_up_after)
        if now >= deadline:
            return None
        return min(now + timedelta(seconds=self.wait(failures)), deadline)
