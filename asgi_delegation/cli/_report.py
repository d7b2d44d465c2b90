"""Plain-text reporting for the CLI: percentiles, tables, a histogram and a progress bar; and
the doctor's checks, one line each, PASS, FAIL, SKIP or WARN."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

PASS, FAIL, SKIP, WARN = "PASS", "FAIL", "SKIP", "WARN"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (nearest rank) and the count."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def table(title: str, unit: str, rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """A section with one row of percentiles per measurement."""
    lines = [title, f"  {'':<34}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'n':>8}  ({unit})"]
    for name, figures in rows:
        if not figures.get("n"):
            lines.append(f"  {name:<34}{'-':>10}")
            continue
        cells = "".join(
            f"{figures[k]:>10.{_digits(figures[k])}f}" for k in ("p50", "p90", "p99", "max")
        )
        lines.append(f"  {name:<34}{cells}{int(figures['n']):>8}")
    return "\n".join(lines)


def _digits(value: float) -> int:
    return 0 if value >= 100 else 1 if value >= 10 else 2


def facts(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A section of named values."""
    return "\n".join([title, *(f"  {name:<34}{value}" for name, value in rows)])


def histogram(samples: Sequence[float], unit: str, *, bins: int = 10, width: int = 40) -> str:
    """Horizontal bars of how many samples fell in each of ``bins`` equal ranges."""
    if not samples:
        return "  (no samples)"
    low, high = min(samples), max(samples)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in samples:
        counts[min(int((value - low) / step), bins - 1)] += 1
    top = max(counts)
    lines = []
    for i, count in enumerate(counts):
        start = low + i * step
        bar = "#" * math.ceil(width * count / top) if count else ""
        lines.append(f"  {start:>9.2f} - {start + step:<9.2f}{unit:<3}|{bar:<{width}} {count}")
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._enabled = enabled and stream.isatty()

    def show(self, phase: str, done: float) -> None:
        if self._enabled:
            filled = int(30 * min(max(done, 0.0), 1.0))
            self._stream.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {phase:<40}")
            self._stream.flush()

    def clear(self) -> None:
        if self._enabled:
            self._stream.write("\r" + " " * 74 + "\r")
            self._stream.flush()
