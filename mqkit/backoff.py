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
from dataclasses import dataclass
from typing import Any

__all__ = ["LINK_BACKOFF", "Backoff"]


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
