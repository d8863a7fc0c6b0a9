"""Health checks without the store: thresholds, output caps, and each probe against a real
loopback target; then the checker's scheduling against a small in-memory stand-in store."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, Check, CheckDefinition
from dnsdisco.catalog.probe import (
    OUTPUT_MAX_SIZE,
    Thresholds,
    http_headers,
    http_probe,
    output_limit,
    probe_timeout,
    script_output,
    script_probe,
    split_host_port,
    tail_output,
    tcp_probe,
    truncate_ttl_output,
)
from dnsdisco.errors import CatalogError

# -- thresholds ---------------------------------------------------------------------------

P, W, C = PASSING, WARNING, CRITICAL


@pytest.mark.parametrize(
    ("sbp", "fbw", "fbc", "results", "recorded"),
    [
        # No thresholds: every result is recorded as it is.
        (0, 0, 0, [P, C, W, C, P], [P, C, W, C, P]),
        # Counters start at their thresholds: the first result applies at once, either way.
        (3, 0, 3, [P], [P]),
        (3, 0, 3, [C], [C]),
        # SuccessBeforePassing=2 after a failure: one pass is not enough, two are.
        (2, 0, 0, [C, P, P, P], [C, None, P, P]),
        # A warning counts as a success (and is recorded as warning once the count is met).
        (2, 0, 0, [C, W, P], [C, None, P]),
        (2, 0, 0, [C, P, W], [C, None, W]),
        # FailuresBeforeCritical=3 with FailuresBeforeWarning=2: silent, warning, critical.
        (0, 2, 3, [P, C, C, C, C], [P, None, W, C, C]),
        # FailuresBeforeWarning defaults to FailuresBeforeCritical: no intermediate warning.
        (0, 0, 2, [P, C, C], [P, None, C]),
        # A success resets the failure count.
        (0, 0, 2, [P, C, P, C, C], [P, None, P, None, C]),
        # A failure resets the success count.
        (2, 0, 0, [C, P, C, P, P], [C, None, C, None, P]),
        # FailuresBeforeWarning above FailuresBeforeCritical is clamped to it.
        (0, 5, 2, [P, C, C], [P, None, C]),
    ],
)
def test_thresholds(sbp, fbw, fbc, results, recorded):
    th = Thresholds(sbp, fbw, fbc)
    got = []
    for i, status in enumerate(results):
        out = th.update(status, f"out{i}")
        got.append(None if out is None else out[0])
        if out is not None:
            assert out[1] == f"out{i}"  # the output travels with the result that is recorded
    assert got == recorded


def test_thresholds_for_definition():
    th = Thresholds.for_definition(CheckDefinition(success_before_passing=2,
                                                   failures_before_warning=1,
                                                   failures_before_critical=3))
    assert (th.success_before_passing, th.failures_before_warning,
            th.failures_before_critical) == (2, 1, 3)


# -- output caps --------------------------------------------------------------------------


def test_ttl_output_within_limit_is_unchanged():
    assert truncate_ttl_output("x" * 10, 10) == "x" * 10
    assert truncate_ttl_output("", 10) == ""


def test_ttl_output_keeps_the_head_and_says_how_much():
    assert truncate_ttl_output("abcdefghij", 4) == "abcd ... (captured 4 of 10 bytes)"
    big = "y" * 5000
    assert truncate_ttl_output(big) == "y" * 4096 + " ... (captured 4096 of 5000 bytes)"


def test_ttl_output_counts_bytes_and_never_splits_a_character():
    # "é" is two bytes: a 3-byte cap holds one of them and half of the next, which is dropped.
    assert truncate_ttl_output("ééé", 3) == "é ... (captured 3 of 6 bytes)"


def test_tail_output_keeps_the_end():
    assert tail_output(b"0123456789", 4) == "6789"
    assert tail_output(b"abc", 4) == "abc"


def test_output_limit_never_exceeds_the_agent_cap():
    assert output_limit(CheckDefinition()) == OUTPUT_MAX_SIZE == 4096
    assert output_limit(CheckDefinition(output_max_size=100)) == 100
    assert output_limit(CheckDefinition(output_max_size=1 << 20)) == 4096


def test_script_output_preamble_only_when_truncated():
    assert script_output(b"hello", 5, 10) == "hello"
    assert script_output(b"6789", 10, 4) == "Captured 4 of 10 bytes\n...\n6789"


def test_timeout_defaults():
    assert probe_timeout(CheckDefinition(http="http://x/")) == 10.0
    assert probe_timeout(CheckDefinition(script_args=("true",))) == 30.0
    assert probe_timeout(CheckDefinition(tcp="x:1", timeout=2.5)) == 2.5


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:53", ("::1", 53)),
     ("db.example:5432", ("db.example", 5432)), (":8080", ("", 8080))],
)
def test_split_host_port(addr, expected):
    assert split_host_port(addr) == expected


@pytest.mark.parametrize("addr", ["localhost", "::1:80", "[::1]", "host:http", "host:70000"])
def test_split_host_port_rejects(addr):
    with pytest.raises(ValueError):
        split_host_port(addr)


def test_http_headers_defaults_and_overrides():
    h = http_headers(CheckDefinition(header={"X-A": ("1", "2")}))
    assert h.getall("X-A") == ["1", "2"]
    assert h["User-Agent"] == "Consul Health Check"
    assert h["Accept"] == "text/plain, text/*, */*"
    h = http_headers(CheckDefinition(header={"user-agent": ("probe/1",), "Host": ("a", "b")}))
    assert h.getall("User-Agent") == ["probe/1"]
    assert h.getall("Host") == ["a"]  # the first value wins, as Go's Header.Get


# -- loopback targets ---------------------------------------------------------------------


class Target:
    """A loopback HTTP server whose answer the test sets; it records every request."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok"
        self.headers: dict[str, str] = {}
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[str, str, dict[str, list[str]], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.requests.append((request.method, request.path_qs, headers, await request.read()))
        if request.path == "/redirect":
            raise web.HTTPFound("/")
        if self.delay:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
        return web.Response(status=self.status, body=self.body, headers=self.headers)


async def _serve(handler: Callable, ssl_context: ssl.SSLContext | None = None):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    runner, port = await _serve(t.handle)
    t.url = f"http://127.0.0.1:{port}"
    yield t
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                              cookie_jar=aiohttp.DummyCookieJar())
    yield s
    await s.close()


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- HTTP probe ---------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status", "reason"),
                         [(200, P, "OK"), (204, P, "No Content"), (429, W, "Too Many Requests"),
                          (500, C, "Internal Server Error"), (404, C, "Not Found"),
                          (301, C, "Moved Permanently")])
async def test_http_status_mapping(target, session, code, status, reason):
    target.status = code
    target.body = b"" if code == 204 else b"body text"
    if code == 301:
        target.headers = {"Location": "/elsewhere"}
    defn = CheckDefinition(http=target.url + "/health", interval=10, disable_redirects=code == 301)
    got = await http_probe(defn, session)
    body = "" if code == 204 else "body text"
    assert got == (status, f"HTTP GET {target.url}/health: {code} {reason} Output: {body}")


async def test_http_request_shape(target, session):
    defn = CheckDefinition(http=target.url + "/h?x=1", method="post", body='{"a":1}',
                           header={"X-Multi": ("a", "b"), "Host": ("svc.internal",)})
    status, output = await http_probe(defn, session)
    assert status == PASSING
    assert output.startswith(f"HTTP POST {target.url}/h?x=1: 200 OK")
    method, path, headers, body = target.requests[-1]
    assert (method, path, body) == ("POST", "/h?x=1", b'{"a":1}')
    assert headers["user-agent"] == ["Consul Health Check"]
    assert headers["accept"] == ["text/plain, text/*, */*"]
    assert headers["x-multi"] == ["a", "b"]
    assert headers["host"] == ["svc.internal"]
    assert headers["connection"] == ["close"]  # keep-alive off, as Consul
    assert "content-type" not in headers


async def test_http_overridden_defaults(target, session):
    defn = CheckDefinition(http=target.url, header={"Accept": ("application/json",),
                                                    "User-Agent": ("mine",)})
    await http_probe(defn, session)
    headers = target.requests[-1][2]
    assert headers["accept"] == ["application/json"]
    assert headers["user-agent"] == ["mine"]


async def test_http_redirects_followed_unless_disabled(target, session):
    follow = CheckDefinition(http=target.url + "/redirect")
    status, output = await http_probe(follow, session)
    assert status == PASSING
    assert [r[1] for r in target.requests] == ["/redirect", "/"]
    # The output names the configured URL, not where the redirect led.
    assert output.startswith(f"HTTP GET {target.url}/redirect: 200 OK")
    status, output = await http_probe(
        CheckDefinition(http=target.url + "/redirect", disable_redirects=True), session)
    assert status == CRITICAL
    assert ": 302 Found Output:" in output


async def test_http_body_keeps_the_last_bytes(target, session):
    target.body = b"a" * 5000 + b"THE END"
    status, output = await http_probe(CheckDefinition(http=target.url), session)
    assert status == PASSING
    body = output.split(" Output: ", 1)[1]
    assert len(body) == 4096 and body.endswith("THE END")
    _, output = await http_probe(CheckDefinition(http=target.url, output_max_size=7), session)
    assert output.endswith("Output: THE END")


async def test_http_connection_refused_is_critical(session):
    url = f"http://127.0.0.1:{free_port()}/"
    status, output = await http_probe(CheckDefinition(http=url), session)
    assert status == CRITICAL
    assert output.startswith(f'Get "{url}": ')
    assert "127.0.0.1" in output


async def test_http_timeout_is_critical(target, session):
    target.delay = 0.5
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, output = await http_probe(CheckDefinition(http=target.url, timeout=0.1), session)
    assert loop.time() - start < 0.4
    assert (status, output) == (CRITICAL, f'Get "{target.url}": timed out after 100ms')


async def test_http_bad_url_is_critical(session):
    status, output = await http_probe(CheckDefinition(http="not a url"), session)
    assert status == CRITICAL
    assert output.startswith('Get "not a url": ')


def _self_signed(tmp_path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dnsdisco-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    return ctx


async def test_https_verify_skip_verify_and_server_name(tmp_path, session):
    ctx = _self_signed(tmp_path)
    sni: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment]
    t = Target()
    runner, port = await _serve(t.handle, ctx)
    try:
        url = f"https://127.0.0.1:{port}/"
        status, output = await http_probe(CheckDefinition(http=url), session)
        assert status == CRITICAL and "certificate" in output.lower()
        status, output = await http_probe(CheckDefinition(http=url, tls_skip_verify=True), session)
        assert (status, output) == (PASSING, f"HTTP GET {url}: 200 OK Output: ok")
        await http_probe(CheckDefinition(http=url, tls_skip_verify=True,
                                         tls_server_name="api.internal"), session)
        assert sni[-1] == "api.internal"
    finally:
        await runner.cleanup()


# -- TCP probe ----------------------------------------------------------------------------


async def test_tcp_up_and_down():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    addr = f"127.0.0.1:{port}"
    try:
        assert await tcp_probe(CheckDefinition(tcp=addr)) == (PASSING, f"TCP connect {addr}: Success")
    finally:
        server.close()
        await server.wait_closed()
    status, output = await tcp_probe(CheckDefinition(tcp=addr))
    assert status == CRITICAL
    assert output.startswith(f"dial tcp {addr}: ") and "refused" in output.lower()


async def test_tcp_tries_every_resolved_address():
    # "localhost" resolves to ::1 and 127.0.0.1 on most hosts; listening on 127.0.0.1 only
    # must still pass whichever comes first.
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, output = await tcp_probe(CheckDefinition(tcp=f"localhost:{port}"))
        assert (status, output) == (PASSING, f"TCP connect localhost:{port}: Success")
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_bad_address_is_critical():
    status, output = await tcp_probe(CheckDefinition(tcp="no-port-here"))
    assert status == CRITICAL and "missing port" in output


# -- script probe -------------------------------------------------------------------------


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


@pytest.mark.parametrize(("code", "status"), [(0, P), (1, W), (2, C), (127, C)])
async def test_script_exit_codes(code, status):
    got = await script_probe(CheckDefinition(
        script_args=py(f"import sys; print('out'); print('err', file=sys.stderr); sys.exit({code})")))
    assert got == (status, "out\nerr\n")


async def test_script_output_is_capped_to_its_tail():
    status, output = await script_probe(CheckDefinition(
        script_args=py("print('x' * 10000, end='TAIL')"), output_max_size=8))
    assert (status, output) == (PASSING, "Captured 8 of 10004 bytes\n...\nxxxxTAIL")


async def test_script_timeout_kills_it():
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await script_probe(CheckDefinition(script_args=py("import time; time.sleep(30)"),
                                             timeout=0.3))
    assert got == (CRITICAL, "Timed out (300ms) running check")
    assert loop.time() - start < 5


async def test_script_that_cannot_start_is_critical(tmp_path):
    status, output = await script_probe(CheckDefinition(script_args=(str(tmp_path / "nope"),)))
    assert status == CRITICAL and output.startswith("Failed to start check:")


# -- the checker against an in-memory stand-in ----------------------------------------------


class FakeStore:
    """The narrow store interface the checker uses, held in a dict; records every write."""

    node_name = "node-a"

    def __init__(self) -> None:
        self._checks: dict[tuple[str, str], Check] = {}
        self.sources: dict[str, str] = {}  # check ID -> source, default "api"
        self._listeners: list[Callable[[Check | None, Check | None], None]] = []
        self.writes: list[tuple[str, str, str]] = []
        self.deregistered: list[str] = []
        self.changed = asyncio.Event()

    def checks(self):
        return list(self._checks.values())

    def check(self, node, check_id):
        return self._checks.get((node, check_id))

    def check_source(self, node, check_id):
        return self.sources.get(check_id, "api") if (node, check_id) in self._checks else None

    def add_check_listener(self, fn):
        self._listeners.append(fn)

    def put(self, check: Check) -> None:
        before = self._checks.get((check.node, check.check_id))
        self._checks[(check.node, check.check_id)] = check
        for fn in self._listeners:
            fn(before, check)

    def remove(self, node: str, check_id: str) -> None:
        before = self._checks.pop((node, check_id))
        for fn in self._listeners:
            fn(before, None)

    async def set_check_status(self, node, check_id, status, output):
        before = self._checks.get((node, check_id))
        if before is None:
            raise CatalogError(f'Unknown check ID "{check_id}"', 404)
        self.writes.append((check_id, status, output))
        self.changed.set()
        if (before.status, before.output) == (status, output):
            return False
        self.put(Check(**{**{f: getattr(before, f) for f in Check.__slots__},
                          "status": status, "output": output}))
        return True

    async def deregister_service(self, node, service_id):
        self.deregistered.append(service_id)
        for (n, cid), c in list(self._checks.items()):
            if n == node and c.service_id == service_id:
                self.remove(n, cid)


async def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def fake() -> AsyncIterator[FakeStore]:
    yield FakeStore()


async def test_checker_runs_the_agents_own_checks_only(fake, target):
    defn = CheckDefinition(http=target.url, interval=0.05)
    fake.sources["catalog"] = "catalog"
    fake.put(Check("node-a", "mine", "mine", definition=defn))
    fake.put(Check("node-b", "theirs", "theirs", definition=defn))
    fake.put(Check("node-a", "catalog", "catalog", definition=defn))
    fake.put(Check("node-a", "ttl-catalog", "x", definition=CheckDefinition(ttl=10)))
    fake.sources["ttl-catalog"] = "catalog"
    hc = HealthChecker(fake, min_interval=0.01)
    await hc.start()
    try:
        await wait_for(lambda: fake.check("node-a", "mine").status == PASSING)
        await asyncio.sleep(0.15)
        assert fake.check("node-b", "theirs").status == CRITICAL
        assert fake.check("node-a", "catalog").status == CRITICAL
        assert {w[0] for w in fake.writes} == {"mine"}
        # To the agent API a catalog-registered check does not exist.
        with pytest.raises(CatalogError) as e:
            await hc.ttl_update("ttl-catalog", PASSING, "")
        assert e.value.status == 404
    finally:
        await hc.stop()


async def test_checker_follows_added_changed_and_removed_checks(fake, target):
    hc = HealthChecker(fake, min_interval=0.01)
    await hc.start()
    try:
        fake.put(Check("node-a", "c", "c", definition=CheckDefinition(http=target.url, interval=0.05)))
        await wait_for(lambda: fake.check("node-a", "c").status == PASSING)
        # A new definition restarts the runner against the new target.
        fake.put(Check("node-a", "c", "c", status=PASSING,
                       definition=CheckDefinition(tcp=f"127.0.0.1:{free_port()}", interval=0.05)))
        await wait_for(lambda: fake.check("node-a", "c").status == CRITICAL)
        assert fake.check("node-a", "c").output.startswith("dial tcp")
        fake.remove("node-a", "c")
        await asyncio.sleep(0.02)
        n = len(fake.writes)
        await asyncio.sleep(0.2)
        assert len(fake.writes) == n  # the runner is gone
    finally:
        await hc.stop()


async def test_min_interval_is_enforced(fake, target, caplog):
    fake.put(Check("node-a", "c", "c", definition=CheckDefinition(http=target.url, interval=0.001)))
    hc = HealthChecker(fake, min_interval=0.2)
    with caplog.at_level("WARNING", logger="dnsdisco.health"):
        await hc.start()
    try:
        await asyncio.sleep(0.5)
        # First run within [0, 0.2), then every 0.2 s: at most 3 runs in 0.5 s, not hundreds.
        assert 1 <= len(target.requests) <= 3
        assert "interval below minimum" in caplog.text
    finally:
        await hc.stop()


async def test_script_checks_run_only_when_enabled(fake):
    defn = CheckDefinition(script_args=py("pass"), interval=0.05)
    fake.put(Check("node-a", "s", "s", definition=defn))
    hc = HealthChecker(fake, min_interval=0.01)
    await hc.start()
    await asyncio.sleep(0.2)
    await hc.stop()
    assert fake.writes == []
    hc = HealthChecker(fake, min_interval=0.01, enable_script_checks=True)
    await hc.start()
    try:
        await wait_for(lambda: fake.check("node-a", "s").status == PASSING)
    finally:
        await hc.stop()


async def test_probe_crash_becomes_critical_and_runner_survives(fake, target, monkeypatch):
    import dnsdisco.catalog.health as health

    calls = 0

    async def broken(defn, session):
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    monkeypatch.setattr(health, "http_probe", broken)
    fake.put(Check("node-a", "c", "c", status=PASSING,
                   definition=CheckDefinition(http=target.url, interval=0.02)))
    hc = HealthChecker(fake, min_interval=0.01)
    await hc.start()
    try:
        await wait_for(lambda: calls >= 3)
        check = fake.check("node-a", "c")
        assert (check.status, check.output) == (CRITICAL, "check failed: RuntimeError: boom")
    finally:
        await hc.stop()


async def test_probes_in_flight_are_capped(fake, target):
    target.delay = 0.03
    for i in range(12):
        fake.put(Check("node-a", f"c{i}", "c", definition=CheckDefinition(http=target.url, interval=0.01)))
    hc = HealthChecker(fake, min_interval=0.01, max_concurrent_probes=3)
    await hc.start()
    try:
        await wait_for(lambda: all(fake.check("node-a", f"c{i}").status == PASSING for i in range(12)))
    finally:
        await hc.stop()
    assert target.max_in_flight == 3  # concurrent, but never above the cap


async def test_ttl_errors(fake):
    fake.put(Check("node-a", "h", "h", definition=CheckDefinition(http="http://x/", interval=10)))
    hc = HealthChecker(fake)
    with pytest.raises(CatalogError) as e:
        await hc.ttl_update("nope", PASSING, "")
    assert e.value.status == 404
    assert e.value.message == ('Unknown check ID "nope". Ensure that the check ID is passed, '
                               'not the check name.')
    with pytest.raises(CatalogError) as e:
        await hc.ttl_update("h", PASSING, "")
    assert (e.value.status, e.value.message) == (500, 'CheckID "h" does not have associated TTL')
    fake.put(Check("node-a", "t", "t", definition=CheckDefinition(ttl=10)))
    with pytest.raises(CatalogError) as e:
        await hc.ttl_update("t", "bogus", "")
    assert e.value.status == 400
    assert fake.writes == []


async def test_ttl_update_expiry_and_reset(fake):
    fake.put(Check("node-a", "t", "t", definition=CheckDefinition(ttl=0.2, output_max_size=5)))
    hc = HealthChecker(fake)
    await hc.start()
    try:
        await hc.ttl_update("t", PASSING, "all good")
        # The write is done when ttl_update returns, truncated as Consul truncates TTL output.
        assert fake.writes[-1] == ("t", PASSING, "all g ... (captured 5 of 8 bytes)")
        await asyncio.sleep(0.12)
        await hc.ttl_update("t", WARNING, "meh")  # resets the timer
        await asyncio.sleep(0.12)
        assert fake.check("node-a", "t").status == WARNING  # 0.24 s after the first update
        await wait_for(lambda: fake.check("node-a", "t").status == CRITICAL, 1.0)
        assert fake.check("node-a", "t").output == "TTL expired (last output before timeout follows): meh"
    finally:
        await hc.stop()


async def test_ttl_never_updated_expires_plainly(fake):
    fake.put(Check("node-a", "t", "t", status=PASSING, definition=CheckDefinition(ttl=0.1)))
    hc = HealthChecker(fake)
    await hc.start()
    try:
        await wait_for(lambda: fake.check("node-a", "t").status == CRITICAL, 1.0)
        assert fake.check("node-a", "t").output == "TTL expired"
    finally:
        await hc.stop()


async def test_reaper_uses_the_injected_clock(fake, caplog):
    now = [1000.0]
    defn = CheckDefinition(ttl=3600, deregister_critical_service_after=90)
    fake.put(Check("node-a", "svc-check", "x", service_id="web-1", definition=defn))
    fake.put(Check("node-a", "other", "x", service_id="db-1", status=PASSING, definition=defn))
    hc = HealthChecker(fake, clock=lambda: now[0], reap_interval=3600)
    with caplog.at_level("WARNING", logger="dnsdisco.health"):
        await hc.start()
    try:
        assert "deregister interval" not in caplog.text  # 90 s is above the 1 min floor
        now[0] += 90
        assert await hc.reap() == []  # not *longer* than the timeout yet
        # Passing resets the critical-since time; critical again starts a new count.
        await hc.ttl_update("svc-check", PASSING, "")
        await hc.ttl_update("svc-check", CRITICAL, "")
        now[0] += 60
        assert await hc.reap() == []
        now[0] += 31
        assert await hc.reap() == ["web-1"]
        assert fake.deregistered == ["web-1"]
        assert fake.check("node-a", "svc-check") is None
        assert fake.check("node-a", "other") is not None
        assert await hc.reap() == []
    finally:
        await hc.stop()


async def test_deregister_after_is_raised_to_the_minimum(fake, caplog):
    now = [0.0]
    fake.put(Check("node-a", "c", "x", service_id="web-1",
                   definition=CheckDefinition(ttl=3600, deregister_critical_service_after=1)))
    hc = HealthChecker(fake, clock=lambda: now[0], reap_interval=3600)
    with caplog.at_level("WARNING", logger="dnsdisco.health"):
        await hc.start()
    try:
        assert "deregister interval below minimum of 1m0s" in caplog.text
        now[0] = 30
        assert await hc.reap() == []
        now[0] = 61
        assert await hc.reap() == ["web-1"]
    finally:
        await hc.stop()


async def test_stop_cancels_everything(fake, target):
    fake.put(Check("node-a", "c", "c", definition=CheckDefinition(http=target.url, interval=0.02)))
    fake.put(Check("node-a", "t", "t", status=PASSING, definition=CheckDefinition(ttl=0.1)))
    hc = HealthChecker(fake, min_interval=0.01)
    await hc.start()
    await wait_for(lambda: len(fake.writes) >= 1)
    await hc.stop()
    n = len(fake.writes)
    await asyncio.sleep(0.2)
    assert len(fake.writes) == n
    assert fake.check("node-a", "t").status == PASSING  # its TTL timer died with the checker
    assert not hc.running
