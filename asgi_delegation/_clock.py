"""The clocks the package reads, in one place so tests can move time without sleeping."""

from __future__ import annotations

import time

#: Wall-clock seconds, compared with token claims (``exp``, ``nbf``, ``iat``).
now = time.time
#: Monotonic seconds, for cache lifetimes, cooldowns and backoff.
monotonic = time.monotonic
