"""Value checks shared by the config loaders (``config`` and ``sync.upstream``) and the HTTP API.

Each checker takes a decoded JSON value and returns it parsed, or raises ``ValueError`` with the
text an operator sees after the source and key (``expected an integer, got a string``). They
know nothing of where the value came from; the loaders add that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def kind(v: Any) -> str:
    """How a JSON value is named in error messages."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {kind(v)}")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {kind(v)}")
    return v


def integer(lo: int, hi: int) -> Callable[[Any], int]:
    """A checker for a whole number in ``[lo, hi]`` (a JSON boolean is not a number here)."""
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {kind(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


def go_bool(value: str) -> bool | None:
    """Go's ``strconv.ParseBool``, as Consul reads query flags and env vars; None if it would fail."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None
