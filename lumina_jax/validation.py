"""Checks of the numbers a user supplies: command-line flags, config fields and Python API arguments.

One rule per kind of value, shared by argparse (`int_flag`, `float_flag` as `type=`) and by the library's own
checks (`check_int`, `check_float`), so a command and the function behind it refuse the same values with the
same one-line message: non-finite floats always, integers and floats outside their range, booleans and
strings where a number belongs.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
from typing import Any, Callable, Optional

SEED_MAX = 2**32 - 1  # jax.random.key keeps the low 32 bits: larger (or negative) seeds alias smaller ones


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def check_int(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """`value` as an int, refusing bools, non-integral numbers, strings and values outside [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_range_text(lo, hi)}, got {value}")
    return value


def check_float(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float, refusing bools, strings, NaN, infinities and values outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise ValueError(f"{name} must be {_range_text(lo, hi, lo_open, hi_open)}, got {value}")
    return value


def int_flag(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse `type=` for an integer flag in [lo, hi] (a bad value is a usage error, exit status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int("value", value, lo, hi)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    parse.__name__ = "integer"
    return parse


def float_flag(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
               hi_open: bool = False) -> Callable[[str], float]:
    """An argparse `type=` for a finite float flag in the given range (NaN and infinities refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_float("value", value, lo, hi, lo_open, hi_open)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    parse.__name__ = "number"
    return parse


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def parse_json(data: bytes | str, source: str) -> Any:
    """Strict JSON (UTF-8; NaN and Infinity refused); any problem is a ValueError naming `source`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except RecursionError:
        raise ValueError(f"{source}: malformed JSON (nested too deeply)") from None
    except ValueError as e:
        raise ValueError(f"{source}: malformed JSON ({e})") from None
