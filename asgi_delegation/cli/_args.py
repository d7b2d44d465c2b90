"""Argument types shared by the subcommands: argparse turns their errors into exit code 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(low: float, high: float, unit: str = "seconds") -> Callable[[str], float]:
    """A number of ``unit`` between ``low`` and ``high``."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {value!r}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} {unit}")
        return number

    return parse


def count(value: str) -> int:
    """A whole number, 1 or more."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number
