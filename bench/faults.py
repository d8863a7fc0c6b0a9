#!/usr/bin/env python3
"""Faults, the long versions of tests/integration/test_faults.py: nothing acknowledged is lost,
DNS keeps answering.

Scenarios (``--only``), each against agent processes this script starts:

  kill9   an agent with -data-dir under a stream of registrations, re-registrations and
          deregistrations (WORKERS clients, one request in flight each) for STREAM seconds, then
          SIGKILL mid-request and a restart on the same data dir, KILLS times in a row. After
          each restart every service ID the clients ever touched is checked one by one, over
          HTTP and in DNS (SRV port and glue address): it must be in its last acknowledged state,
          or in the state of the request that was in flight at the kill. Reports acks, in-flight
          requests at each kill, mismatches (must be 0) and the restart time (process start to
          "agent started", and to /ready 200).
  flap    a mirror-mode agent following a second dnsdisco agent (the stand-in Consul) that is
          killed with SIGKILL and restarted FLAPS times, about once a second, every other time
          as a fresh cluster (new data dir: a lower index) with a different catalog, while a
          client queries the mirror's DNS for a name both catalogs have, back to back. Reports
          the DNS answers that were right (availability, must be 100%), SERVFAIL/NXDOMAIN/
          timeouts, and per restart the time from the upstream being up to the mirror's DNS
          answering exactly its catalog (convergence).

    python bench/faults.py                       # 10 kills x 3 s, 20 flaps: about 1.5 minutes
    python bench/faults.py --kills 3 --flaps 5   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _benchlib import (run_main, BenchError, Processes, add_common_args, code_version, free_port, median,  # noqa: E402
                       percentile, sigterm_as_exit, start_agent, verdict)

from tests.integration.test_faults import (DnsProbe, Ledger, check_ledger, mirror_converged,  # noqa: E402
                                           services_file, write_stream)

ALL = ("kill9", "flap")


@dataclass
class Target:
    """What check_ledger and mirror_converged need of an agent."""

    base: str
    dns_port: int


def ready_after(base: str, t0: float, timeout: float = 60.0) -> float:
    """Seconds from *t0* until GET /ready answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise BenchError(f"{base}/ready not 200 within {timeout}s")


def kill9(procs: Processes, agent) -> None:
    """SIGKILL the agent process itself (not its group: its DNS workers must notice alone)."""
    agent.proc.popen.send_signal(signal.SIGKILL)
    agent.proc.popen.wait(10)
    procs.stop(agent.proc)  # reaps what is left of the group and closes the log


def run_kill9(procs: Processes, work: Path, args: argparse.Namespace, results: dict) -> bool:
    data = work / "kill9-data"
    ledger = Ledger()
    rounds = []
    agent = start_agent(procs, "agent-0", ["-node", "bench", "-data-dir", str(data), "-http-port", "0",
                                           "-dns-port", "0"], work / "kill9-0.log")
    for k in range(args.kills):
        target = Target(agent.base_url, agent.dns_port)
        stop = asyncio.Event()
        acks_before = ledger.acks

        async def stream() -> int:
            task = asyncio.create_task(write_stream(target.base, ledger, workers=args.workers, stop=stop,
                                                    prefix=f"r{k}w"))
            await asyncio.sleep(args.stream)
            in_flight = len(ledger.inflight)
            agent.proc.popen.send_signal(signal.SIGKILL)
            await asyncio.wait_for(task, 30)
            return in_flight

        in_flight = asyncio.run(stream())
        kill9(procs, agent)
        if ledger.refused:
            raise BenchError(f"writes refused before the kill: {ledger.refused[:5]}")
        t0 = time.monotonic()
        agent = start_agent(procs, f"agent-{k + 1}", ["-node", "bench", "-data-dir", str(data),
                                                       "-http-port", "0", "-dns-port", "0"],
                            work / f"kill9-{k + 1}.log")
        ready = ready_after(agent.base_url, t0)
        checked, wrong = asyncio.run(check_ledger(Target(agent.base_url, agent.dns_port), ledger))
        row = {"round": k + 1, "acks": ledger.acks - acks_before, "in_flight_at_kill": in_flight,
               "ids_checked": checked, "mismatches": len(wrong), "examples": wrong[:5],
               "started_s": round(agent.ready_after, 3), "ready_s": round(ready, 3)}
        rounds.append(row)
        print(f"  kill {k + 1}: {row['acks']} acks in {args.stream:g}s, {in_flight} in flight at the kill; "
              f"{checked} IDs checked over HTTP and DNS, {len(wrong)} wrong; restart: started "
              f"{row['started_s']:.2f}s, /ready {row['ready_s']:.2f}s", flush=True)
        # The next round starts from what survived: the requests in flight at the kill are
        # settled now, one way or the other.
        ledger.inflight.clear()
        ledger.acked.clear()
        _resync(ledger, Target(agent.base_url, agent.dns_port))
    ok = all(r["mismatches"] == 0 for r in rounds)
    results["kill9"] = {"rounds": rounds, "total_acks": ledger.acks, "ok": ok,
                        "started_s_median": median([r["started_s"] for r in rounds]),
                        "ready_s_median": median([r["ready_s"] for r in rounds]),
                        "ready_s_max": max(r["ready_s"] for r in rounds)}
    return ok


def _resync(ledger: Ledger, target: Target) -> None:
    """Take the restarted agent's state as the acknowledged baseline for the next round (it was
    just checked against the ledger), so each round's in-flight ambiguity is settled."""
    with urllib.request.urlopen(f"{target.base}/v1/agent/services", timeout=10) as r:
        services = json.load(r)
    for sid, svc in services.items():
        if sid in ledger.addresses:
            ledger.acked[sid] = svc["Port"]
    for sid in ledger.addresses:
        ledger.acked.setdefault(sid, None)


def run_flap(procs: Processes, work: Path, args: argparse.Namespace, results: dict) -> bool:
    old = {"stable": "10.7.0.1", "gen-old": "10.7.1.1"}
    fresh = {"stable": "10.7.0.1", "gen-fresh": "10.7.2.1"}
    services_file(work / "conf-old", old)
    services_file(work / "conf-fresh", fresh)
    up_port = free_port()
    base = f"http://127.0.0.1:{up_port}"

    def upstream(name: str, conf: str, data: Path):
        # Its DNS is on (unused) because start_agent reads the ports from the log line.
        return start_agent(procs, name, ["-node", "consul-1", "-http-port", str(up_port), "-dns-port", "0",
                                         "-dns-workers", "1",
                                         "-data-dir", str(data), "-config-dir", str(work / conf)],
                           work / f"{name}.log")

    up = upstream("upstream-0", "conf-old", work / "up-old")
    # A long history of catalog changes (KV writes would not move the catalog endpoints' index),
    # so that the fresh clusters come back with a lower index.
    for i in range(20):
        for path, body in (("register", b'{"Name": "history"}'), ("deregister/history", b"")):
            req = urllib.request.Request(f"{base}/v1/agent/service/{path}", data=body, method="PUT")
            urllib.request.urlopen(req, timeout=10).close()
    (work / "mirror.json").write_text(json.dumps({"upstream": {
        "address": base, "wait": f"{args.wait:g}s", "query_interval": "0s", "backoff_min": "20ms", "backoff_max": "250ms",
        "resync_interval": "0s"}}))
    mirror_agent = start_agent(procs, "mirror", ["-node", "mirror1", "-config-file", str(work / "mirror.json"),
                                                 "-http-port", "0", "-dns-port", "0"], work / "mirror.log")
    mirror = Target(mirror_agent.base_url, mirror_agent.dns_port)
    _wait(lambda: mirror_converged(mirror, old, set()), 20, "the mirror's first sync")
    flaps = []
    with DnsProbe(mirror.dns_port, "stable.service.consul", {"10.7.0.1"}) as probe:
        t_begin = time.monotonic()
        for f in range(args.flaps):
            t0 = time.monotonic()
            kill9(procs, up)
            time.sleep(args.down)
            is_fresh = f % 2 == 0
            conf, data = ("conf-fresh", work / f"up-fresh-{f}") if is_fresh else ("conf-old", work / "up-old")
            up = upstream(f"upstream-{f + 1}", conf, data)
            t_up = time.monotonic()
            catalog, gone = (fresh, {"gen-old"}) if is_fresh else (old, {"gen-fresh"})
            _wait(lambda: mirror_converged(mirror, catalog, gone), 30, f"convergence after restart {f + 1}")
            converge = time.monotonic() - t_up
            flaps.append({"flap": f + 1, "fresh": is_fresh, "upstream_down_s": round(t_up - t0, 3),
                          "converge_s": round(converge, 3)})
            time.sleep(max(0.0, args.period - (time.monotonic() - t0)))
        seconds = time.monotonic() - t_begin
    total = sum(probe.outcomes.values())
    good = probe.outcomes.get("ok", 0)
    conv = [f["converge_s"] for f in flaps]
    ok = good == total and total > 0
    results["flap"] = {"flaps": flaps, "dns_queries": total, "outcomes": probe.outcomes, "seconds": round(seconds, 1),
                       "availability_pct": round(100.0 * good / max(total, 1), 4), "bad_examples": probe.bad[:10],
                       "converge_s_median": median(conv), "converge_s_p90": percentile(conv, 90),
                       "converge_s_max": max(conv), "ok": ok}
    for fl in flaps:
        print(f"  restart {fl['flap']} ({'fresh, lower index' if fl['fresh'] else 'same data dir'}): upstream "
              f"down {fl['upstream_down_s']:.2f}s, mirror converged {fl['converge_s']:.2f}s after it was up",
              flush=True)
    print(f"  DNS: {total} queries in {seconds:.1f}s, {good} right ({results['flap']['availability_pct']}%), "
          f"outcomes {probe.outcomes}", flush=True)
    return ok


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(ALL), help=f"scenarios to run (of {','.join(ALL)})")
    ap.add_argument("--kills", type=int, default=10, help="kill -9 rounds in a row (default 10)")
    ap.add_argument("--stream", type=float, default=3.0, help="seconds of writes before each kill (default 3)")
    ap.add_argument("--workers", type=int, default=8, help="write clients, one request in flight each")
    ap.add_argument("--flaps", type=int, default=20, help="upstream restarts (default 20)")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between upstream kills (default 1)")
    ap.add_argument("--wait", type=float, default=1.0,
                    help="the mirror's upstream.wait, seconds per blocking query (default 1)")
    ap.add_argument("--down", type=float, default=0.3, help="seconds the upstream stays dead (default 0.3)")
    add_common_args(ap, quiet_wait=0.0)
    args = ap.parse_args(argv)
    scenarios = args.only.split(",")
    if set(scenarios) - set(ALL):
        ap.error(f"unknown scenarios: {set(scenarios) - set(ALL)}")
    sigterm_as_exit()
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="faultbench-"))
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "code": code_version(),
                     "argv": sys.argv, "params": {k: v for k, v in vars(args).items() if k != "json"}}
    print(f"dnsdisco: {results['code']}", flush=True)
    ok = True
    try:
        if "kill9" in scenarios:
            print(f"kill9: {args.kills} x (stream {args.stream:g}s with {args.workers} clients, SIGKILL, restart)")
            ok &= run_kill9(procs, work, args, results)
        if "flap" in scenarios:
            print(f"flap: {args.flaps} upstream restarts every {args.period:g}s, down {args.down:g}s each")
            ok &= run_flap(procs, work, args, results)
        if "kill9" in results:
            k = results["kill9"]
            print(f"\nkill9 {verdict(k['ok'])}: {k['total_acks']} acks over {args.kills} kills, "
                  f"{sum(r['mismatches'] for r in k['rounds'])} lost or wrong; restart to /ready "
                  f"median {k['ready_s_median']:.2f}s, max {k['ready_s_max']:.2f}s")
        if "flap" in results:
            f = results["flap"]
            print(f"flap {verdict(f['ok'])}: DNS availability {f['availability_pct']}% over {f['dns_queries']} "
                  f"queries; convergence median {f['converge_s_median']:.2f}s, p90 {f['converge_s_p90']:.2f}s, "
                  f"max {f['converge_s_max']:.2f}s")
        return 0 if ok else 1
    finally:
        procs.stop_all()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
