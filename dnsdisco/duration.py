"""Go duration strings, as Consul reads and writes them (``10s``, ``1m30s``, ``250ms``, ``1h``).

Consul's config files, check definitions and query parameters (``?wait=``) all use Go's
``time.ParseDuration`` syntax, so a compatible agent must accept exactly that: a sequence of
decimal numbers each with a unit (ns, us, µs, ms, s, m, h), an optional sign, and the bare
``0``. A bare number such as ``60`` is not a duration. Values are seconds as floats.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_MAX_SECONDS = (2**63 - 1) / 1e9
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds; raise ``ValueError`` if it is not one."""
    s = text.strip()
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    if total > _MAX_SECONDS:
        # A Go Duration is an int64 of nanoseconds (~292 years); ParseDuration refuses more.
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds the way Go's ``Duration.String`` does for the values Consul shows
    (``10s``, ``1m30s``, ``1h0m0s``, ``250ms``, ``0s``)."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        ns = round(seconds * 1e9)
        if ns % 1_000_000 == 0:
            out = f"{ns // 1_000_000}ms"
        elif ns % 1000 == 0:
            out = f"{ns // 1000}µs"
        else:
            out = f"{ns}ns"
        return f"-{out}" if neg else out
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    sec_text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        out = f"{int(hours)}h{int(minutes)}m{sec_text}"
    elif minutes:
        out = f"{int(minutes)}m{sec_text}"
    else:
        out = sec_text
    return f"-{out}" if neg else out
