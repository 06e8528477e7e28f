"""Per-client-address rate limit for logins (in memory, per server process)."""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime, timedelta


class AddressRateLimiter:
    """Sliding window: at most `limit` attempts per address within `window`."""

    MAX_ADDRESSES = 100_000  # bound memory under a spray from many addresses

    def __init__(self, limit: int, window: timedelta):
        self.limit, self.window = limit, window
        self._attempts: dict[str, deque[datetime]] = {}
        self._lock = threading.Lock()

    def hit(self, address: str, now: datetime) -> bool:
        """Count one attempt; False when the address is over its limit (attempt refused)."""
        with self._lock:
            attempts = self._attempts.get(address)
            if attempts is None:
                if len(self._attempts) >= self.MAX_ADDRESSES:
                    self._forget_idle(now)
                attempts = self._attempts.setdefault(address, deque())
            while attempts and now - attempts[0] > self.window:
                attempts.popleft()
            if len(attempts) >= self.limit:
                return False
            attempts.append(now)
            return True

    def retry_after(self, address: str, now: datetime) -> int:
        """Seconds until the address may try again."""
        with self._lock:
            attempts = self._attempts.get(address)
            if not attempts:
                return 0
            return max(1, int((attempts[0] + self.window - now).total_seconds()) + 1)

    def _forget_idle(self, now: datetime) -> None:
        for address in [a for a, q in self._attempts.items() if not q or now - q[-1] > self.window]:
            del self._attempts[address]
