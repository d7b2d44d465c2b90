"""A circuit breaker for a dependency the requests can do without (the shared cache).

After ``threshold`` consecutive failures the circuit opens: calls are skipped at the cost of a
comparison, so a dead dependency adds no latency. One call is let through as a probe after
``first_probe`` seconds, then after twice that, up to ``max_probe``; a success closes the
circuit. Warnings are logged at most once per ``warn_every`` seconds per cause.
"""

from __future__ import annotations

import logging
from collections import Counter

from . import _clock


class Breaker:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        threshold: int = 3,
        first_probe: float = 1.0,
        max_probe: float = 30.0,
        warn_every: float = 60.0,
    ) -> None:
        self._logger = logger
        self._what = what
        self._threshold = threshold
        self._first_probe = first_probe
        self._max_probe = max_probe
        self._warn_every = warn_every
        self._failures = 0
        self._open = False
        self._probing = False  # a probe was let through since the circuit last opened
        self._probe_at = 0.0
        self._interval = first_probe
        self._warned_at: dict[str, float] = {}
        self.counts: Counter[str] = Counter()  # "opened", "skipped", and failures by cause

    @property
    def is_open(self) -> bool:
        return self._open

    def allows(self) -> bool:
        if not self._open:
            return True
        now = _clock.monotonic()
        if now >= self._probe_at:
            self._probe_at = now + self._interval  # one probe per interval, however many ask
            self._probing = True
            return True
        self.counts["skipped"] += 1
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False
        if self._open:
            self._open = False
            self._interval = self._first_probe
            self._logger.warning("%s is reachable again: in use once more", self._what)

    def noted(self, cause: str) -> None:
        """A failure outside the calls the breaker guards: warned about, nothing else."""
        self._warn(cause, _clock.monotonic())

    def failed(self, cause: str) -> None:
        self.counts[cause] += 1
        self._failures += 1
        now = _clock.monotonic()
        if self._open:
            # Only a failed probe backs off further: calls that were already under way when the
            # circuit opened fail too, and must not push the next probe out.
            if self._probing:
                self._probing = False
                self._interval = min(self._interval * 2, self._max_probe)
                self._probe_at = now + self._interval
        elif self._failures >= self._threshold:
            self._open = True
            self.counts["opened"] += 1
            self._probe_at = now + self._interval
        self._warn(cause, now)

    def _warn(self, cause: str, now: float) -> None:
        warned = self._warned_at.get(cause)
        if warned is None or now - warned >= self._warn_every:
            self._warned_at[cause] = now
            self._logger.warning(
                "%s failed (%s)%s; requests go on with the in-process cache and direct exchanges",
                self._what,
                cause,
                ", so it is skipped for now" if self._open else "",
            )
