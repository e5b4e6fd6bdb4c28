"""One back-off policy, for every wait between two tries of the link: connecting,
reconnecting after a loss, and re-attaching a consumer, on both runtimes.

```python
from mqkit.backoff import LINK_BACKOFF
LINK_BACKOFF.delay(1)   # 0.1 s (+ up to 0.1 s of jitter)
LINK_BACKOFF.delay(7)   # 5.0 s, the cap: a recovered broker is found within seconds
```

The shells sleep for :meth:`Backoff.delay` (or hand :meth:`Backoff.wait` to tenacity);
they never pick numbers of their own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LINK_BACKOFF", "Backoff", "per_try", "stop_at"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off: ``initial`` seconds after the first failure, times ``factor``
    after each further one, at most ``cap``, plus up to ``jitter`` seconds at random (so many
    clients that lost one broker do not all come back in the same instant)."""

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 0.1

    def base(self, failures: int) -> float:
        """The delay after ``failures`` failures in a row, without jitter."""
        if failures < 1:
            return 0.0
        return min(self.cap, self.initial * self.factor ** min(failures - 1, 64))

    def delay(self, failures: int, *, deadline: float | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row; never past ``deadline``
        (a ``time.monotonic()`` value), so a last try still happens before it."""
        wait = self.base(failures) + (random.uniform(0, self.jitter) if failures else 0.0)
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        return max(0.0, wait)

    def wait(self, *, deadline: float | None = None) -> Any:
        """The same schedule as a tenacity ``wait=`` strategy."""

        def strategy(state: Any) -> float:
            return self.delay(int(state.attempt_number), deadline=deadline)

        return strategy


# Connect, reconnect and re-attach: quick at first, capped so a recovered broker is found
# within a few seconds.
LINK_BACKOFF = Backoff()


def per_try(connect_timeout: float, urls: int, remaining: float | None) -> float:
    """Seconds one of ``urls`` URLs gets to connect: a share of ``connect_timeout``, so a URL
    that does not answer leaves time for the next one, never more than the ``remaining``
    seconds; while reconnecting (``remaining=None``: no deadline), at least 5 s."""
    if remaining is None:
        return max(5.0, connect_timeout)
    return min(remaining, max(2.0, connect_timeout / max(1, urls)))


def stop_at(deadline: float) -> Callable[[Any], bool]:
    """A tenacity ``stop=`` strategy: no further try once ``deadline`` (a
    ``time.monotonic()`` value) is reached."""

    def stop(_state: Any) -> bool:
        return time.monotonic() >= deadline - 0.02

    return stop
