"""The per-account API rate (`API_THROTTLE_USER`) with constant-size state.

DRF's UserRateThrottle keeps, per account, the list of its request times in the window, and
reads, prunes, prepends to and writes back (pickled, in the local-memory cache) that whole
list on every request: at 300 requests/s from one runner account the list holds 18,000
entries and that costs about 2 ms per request, growing with the rate it is meant to allow.
This one counts requests per fixed window and weighs the previous window's count by how much
of it still overlaps the sliding window (the usual sliding-window-counter estimate): two
integers per account, the same limit, the same 429 with Retry-After, in two cache operations
a request.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from rest_framework import throttling


class UserRateThrottle(throttling.UserRateThrottle):
    def allow_request(self, request: Any, view: Any) -> bool:
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.now = self.timer()
        window, into = divmod(self.now, self.duration)
        current = f"{self.key}:{int(window)}"
        # Counted first, in one atomic step (two cache operations a request, not four: the
        # window's count was read, then added or incremented); undone when refused, as DRF
        # counts only the requests it lets through.
        count = self._count(current)
        previous = self.cache.get(f"{self.key}:{int(window) - 1}", 0)
        if previous * (1 - into / self.duration) + count - 1 >= self.num_requests:
            self._uncount(current)
            return False
        return True

    def _count(self, current: str) -> int:
        """This request counted in the current window: its count now."""
        try:
            return self.cache.incr(current)
        except ValueError:  # the window's first request (or its key expired)
            pass
        # Kept for two windows: the next one weighs this one.
        if self.cache.add(current, 1, self.duration * 2):
            return 1
        try:
            return self.cache.incr(current)  # another request added it meanwhile
        except ValueError:  # and it expired since
            self.cache.set(current, 1, self.duration * 2)
            return 1

    def _uncount(self, current: str) -> None:
        with contextlib.suppress(ValueError):  # expired meanwhile: nothing left to undo
            self.cache.decr(current)

    def wait(self) -> float:
        """Seconds until the next window starts (at most the window): the estimate only
        falls from there on."""
        return max(1.0, math.ceil(self.duration - self.now % self.duration))
