"""One run of one health check, and the pure rules around it: what a probe reports, how
thresholds damp it, and how long its output may be.

This module owns everything about a check that does not need the store or a schedule:

* :func:`http_probe`, :func:`tcp_probe` and :func:`script_probe` run a check once and return
  ``(status, output)`` as Consul's agent would record it (spec c.1). They never raise for a
  failed check; a failure *is* a result (critical, with the error as output).
* :class:`Thresholds` is Consul's ``StatusHandler`` as a plain state machine (spec c.2).
* :func:`truncate_ttl_output`, :func:`tail_output` and :func:`output_limit` are the three
  ways Consul caps output (b.4, c.1).

:mod:`dnsdisco.catalog.health` schedules these and writes their results through the store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp
from multidict import CIMultiDict

from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, CheckDefinition
from dnsdisco.duration import format_duration

# Consul's defaults (agent/checks): 10 s for network checks, but 30 s for scripts in code
# even though the docs say 10 s.
DEFAULT_TIMEOUT = 10.0
SCRIPT_TIMEOUT = 30.0
# DefaultBufSize and the agent-wide check_output_max_size are both 4 KB; a check's own
# OutputMaxSize can lower the cap but not raise it past the agent's.
OUTPUT_MAX_SIZE = 4096

USER_AGENT = "Consul Health Check"
ACCEPT = "text/plain, text/*, */*"

_READ_CHUNK = 16384


def output_limit(defn: CheckDefinition) -> int:
    """The output cap for *defn* in bytes: its ``OutputMaxSize`` if set, never above 4 KB."""
    if defn.output_max_size > 0:
        return min(defn.output_max_size, OUTPUT_MAX_SIZE)
    return OUTPUT_MAX_SIZE


def probe_timeout(defn: CheckDefinition) -> float:
    """The time one run of *defn* may take: its ``Timeout``, else Consul's default per type."""
    if defn.timeout > 0:
        return defn.timeout
    return SCRIPT_TIMEOUT if defn.script_args else DEFAULT_TIMEOUT


def truncate_ttl_output(output: str, limit: int = OUTPUT_MAX_SIZE) -> str:
    """Cap a TTL update's output the way Consul does: the **first** *limit* bytes, then
    `` ... (captured N of M bytes)``. Output within the limit is returned unchanged."""
    raw = output.encode()
    if len(raw) <= limit:
        return output
    # errors="ignore" drops a UTF-8 sequence cut in half at the edge rather than inventing a
    # replacement character that was never sent.
    head = raw[:limit].decode(errors="ignore")
    return f"{head} ... (captured {limit} of {len(raw)} bytes)"


def tail_output(data: bytes, limit: int = OUTPUT_MAX_SIZE) -> str:
    """The **last** *limit* bytes of *data* as text: Consul reads HTTP bodies through a ring
    buffer, so a long body keeps its end (where error details usually are)."""
    return data[-limit:].decode(errors="replace") if limit > 0 else ""


class Thresholds:
    """Consul's ``StatusHandler``: decides whether a probe result is recorded (spec c.2).

    * ``SuccessBeforePassing`` consecutive successes are needed before a passing (or warning)
      result is recorded; **a warning counts as a success**.
    * ``FailuresBeforeCritical`` consecutive failures are needed before critical is recorded;
      from ``FailuresBeforeWarning`` failures on (default: the critical threshold) a failure is
      recorded as **warning** instead.
    * Both counters start at their thresholds, so the first result after (re)registration
      applies at once; the thresholds only damp later flapping.

    A threshold of 0 behaves like 1. No I/O, no clock: :meth:`update` is all there is.
    """

    __slots__ = ("success_before_passing", "failures_before_warning",
                 "failures_before_critical", "_successes", "_failures")

    def __init__(self, success_before_passing: int = 0, failures_before_warning: int = 0,
                 failures_before_critical: int = 0) -> None:
        self.success_before_passing = max(success_before_passing, 0)
        self.failures_before_critical = max(failures_before_critical, 0)
        # Unset means "same as critical", and the HTTP layer refuses a higher value; clamp it
        # anyway so a definition from elsewhere cannot make warning unreachable-then-sticky.
        fbw = failures_before_warning if failures_before_warning > 0 else self.failures_before_critical
        self.failures_before_warning = min(fbw, self.failures_before_critical)
        self._successes = self.success_before_passing
        self._failures = self.failures_before_critical

    @classmethod
    def for_definition(cls, defn: CheckDefinition) -> Thresholds:
        return cls(defn.success_before_passing, defn.failures_before_warning,
                   defn.failures_before_critical)

    def update(self, status: str, output: str) -> tuple[str, str] | None:
        """Feed one probe result; return the ``(status, output)`` to record, or ``None`` when
        the result is below its threshold and must change nothing, not even the output."""
        if status in (PASSING, WARNING):
            self._successes += 1
            self._failures = 0
            if self._successes >= self.success_before_passing:
                return status, output
            return None
        self._failures += 1
        self._successes = 0
        if self._failures >= self.failures_before_critical:
            return CRITICAL, output
        if self._failures >= self.failures_before_warning:
            return WARNING, output
        return None


# -- HTTP ---------------------------------------------------------------------------------


def http_headers(defn: CheckDefinition) -> CIMultiDict[str]:
    """The request headers for an HTTP check: the definition's (every value of each key),
    plus Consul's ``User-Agent`` and ``Accept`` unless the definition sets them."""
    headers: CIMultiDict[str] = CIMultiDict()
    for key, values in defn.header.items():
        for value in values:
            headers.add(key, value)
    if "Host" in headers:
        # Go's net/http takes the request Host from the field, not the header map; the first
        # value wins, as Header.Get would return it.
        host = headers.getone("Host")
        del headers["Host"]
        headers["Host"] = host
    headers.setdefault("User-Agent", USER_AGENT)
    headers.setdefault("Accept", ACCEPT)
    return headers


def _describe(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__


async def http_probe(defn: CheckDefinition, session: aiohttp.ClientSession) -> tuple[str, str]:
    """Run an HTTP check once through *session* (whose connector should use
    ``force_close=True``: Consul disables keep-alive for checks).

    2xx is passing, 429 warning, any other status critical, and so is a transport error or a
    timeout. Output is ``HTTP <METHOD> <url>: <status> <reason> Output: <body>`` with the body
    cut to its last :func:`output_limit` bytes.
    """
    method = (defn.method or "GET").upper()
    timeout = probe_timeout(defn)
    limit = output_limit(defn)
    kwargs: dict[str, object] = {}
    if defn.tls_skip_verify:
        kwargs["ssl"] = False
    if defn.tls_server_name:
        kwargs["server_hostname"] = defn.tls_server_name
    try:
        async with session.request(
            method,
            defn.http,
            headers=http_headers(defn),
            data=defn.body.encode() if defn.body else None,
            allow_redirects=not defn.disable_redirects,
            # Go sends no Content-Type of its own; aiohttp would add application/octet-stream.
            skip_auto_headers=("Content-Type",),
            timeout=aiohttp.ClientTimeout(total=timeout),
            **kwargs,  # type: ignore[arg-type]
        ) as resp:
            # Read it all, keeping only the tail: a server that streams a large body still
            # has the connection drained (or the timeout ends it), but memory stays bounded.
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                body += chunk
                if len(body) > limit:
                    del body[:-limit]
            status = resp.status
            reason = resp.reason or ""
    except asyncio.TimeoutError:
        return CRITICAL, f'{method.title()} "{defn.http}": timed out after {format_duration(timeout)}'
    except (aiohttp.ClientError, OSError, ValueError) as e:
        # ValueError covers URLs aiohttp cannot parse; the HTTP layer validates them, but a
        # bad one must still end as a critical check, not a dead runner.
        return CRITICAL, f'{method.title()} "{defn.http}": {_describe(e)}'
    line = f"{status} {reason}".rstrip()
    output = f"HTTP {method} {defn.http}: {line} Output: {tail_output(bytes(body), limit)}"
    if 200 <= status <= 299:
        return PASSING, output
    if status == 429:
        # Too Many Requests: the service is alive but shedding load; Consul says warning.
        return WARNING, output
    return CRITICAL, output


# -- TCP ----------------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` as Go's ``net.SplitHostPort`` does; raise
    ``ValueError`` for anything else."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1:end + 2] != ":":
            raise ValueError(f"address {address}: missing port in address")
        host, port = address[1:end], address[end + 2:]
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address}: missing port in address")
        if ":" in host:
            raise ValueError(f"address {address}: too many colons in address")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address}: invalid port")
    return host, int(port)


async def tcp_probe(defn: CheckDefinition) -> tuple[str, str]:
    """Run a TCP check once: connect to ``defn.tcp`` and close at once.

    Every address the host resolves to is tried in turn and the first connection wins
    (``loop.create_connection`` does exactly that, like Go's dialer). Success is passing with
    ``TCP connect <addr>: Success``; anything else is critical with the error text.
    """
    timeout = probe_timeout(defn)
    try:
        host, port = split_host_port(defn.tcp)
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host or None, port)
    except asyncio.TimeoutError:
        return CRITICAL, f"dial tcp {defn.tcp}: i/o timeout after {format_duration(timeout)}"
    except ValueError as e:
        return CRITICAL, f"dial tcp {_describe(e)}"
    except socket.gaierror as e:
        return CRITICAL, f"dial tcp {defn.tcp}: lookup {host}: {e.strerror}"
    except OSError as e:
        # asyncio words a refused connect as "Connect call failed (addr)"; the errno's own
        # text ("Connection refused") is what an operator greps for. With several addresses
        # there is no single errno and the combined message is the useful one.
        reason = os.strerror(e.errno) if e.errno else _describe(e)
        return CRITICAL, f"dial tcp {defn.tcp}: {reason}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the peer reset the connection after accepting it: the connect still succeeded
    return PASSING, f"TCP connect {defn.tcp}: Success"


# -- Script -------------------------------------------------------------------------------


def script_output(data: bytes, total: int, limit: int = OUTPUT_MAX_SIZE) -> str:
    """A script's captured stdout+stderr as Consul reports it: the last *limit* bytes, and
    when more was written, a ``Captured N of M bytes`` preamble saying so."""
    if total <= limit:
        return data.decode(errors="replace")
    return f"Captured {limit} of {total} bytes\n...\n{tail_output(data, limit)}"


async def script_probe(defn: CheckDefinition) -> tuple[str, str]:
    """Run a script check once (Nagios convention): exit 0 is passing, 1 warning, anything
    else critical, and so is a failure to start it or a timeout.

    ``Args`` are executed directly, without a shell, in a session of their own so that a
    timeout kills the whole process group, as Consul kills the check's children.
    """
    timeout = probe_timeout(defn)
    limit = output_limit(defn)
    try:
        proc = await asyncio.create_subprocess_exec(
            *defn.script_args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError) as e:
        return CRITICAL, f"Failed to start check: {_describe(e)}"
    assert proc.stdout is not None
    buf = bytearray()
    total = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await proc.stdout.read(_READ_CHUNK):
                total += len(chunk)
                buf += chunk
                if len(buf) > limit:
                    del buf[:-limit]
            code = await proc.wait()
    except asyncio.TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return CRITICAL, f"Timed out ({format_duration(timeout)}) running check"
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    output = script_output(bytes(buf), total, limit)
    if code == 0:
        return PASSING, output
    if code == 1:
        return WARNING, output
    return CRITICAL, output


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

