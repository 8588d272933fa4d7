"""A mirror's bandwidth throttle: a token bucket that may go into debt.

How this works: tokens are bytes; they accrue at ``rate`` per second up to ``burst``.  A
frame is sent when the balance is not negative, and its size is then taken, possibly into
debt (a 1 MiB frame is never split or held back for being larger than the burst); the next
frame waits until the debt is paid off.  So over any stretch longer than a frame or two the
bytes sent are ``rate`` x time (+ at most one burst and one frame), which is what the
throttle promises.  Time comes in as an argument: the sender's clock, never read here.
"""

from __future__ import annotations

BURST_SECONDS = 0.05  # the burst: this many seconds' worth of bytes
MIN_BURST = 64 * 1024


class TokenBucket:
    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(MIN_BURST, rate * BURST_SECONDS)
        self._tokens = self.burst
        self._updated = now

    def wait(self, now: float) -> float:
        """Seconds until a frame may be sent (0: now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def balance(self, now: float) -> float:
        """Tokens now: positive is credit, negative is debt."""
        self._refill(now)
        return self._tokens

    def spend(self, nbytes: int, now: float) -> None:
        self._refill(now)
        self._tokens -= nbytes

    def spend_spare(self, nbytes: int, now: float) -> None:
        """Bytes sent when nothing else wanted the link: they use up credit, never into
        debt (a minimum-rate guarantee must not remember what was sent for free)."""
        self._refill(now)
        if self._tokens > 0:
            self._tokens = max(0.0, self._tokens - nbytes)

    def set_rate(self, rate: float, now: float) -> None:
        """A new rate from now on; bytes already owed are paid at the new rate."""
        self._refill(now)
        self.rate = rate
        self.burst = max(MIN_BURST, rate * BURST_SECONDS)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = now
