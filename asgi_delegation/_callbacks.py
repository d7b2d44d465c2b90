"""The application's callbacks (``policy``, ``on_audit``): sync ones may block, so they run in
a worker thread; async ones run on the event loop."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def is_async(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` is a coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        type(callback).__call__
    )
