"""Nothing acknowledged is lost: a real process writes through the store, is killed with
SIGKILL mid-stream, and a store reopened on the same data dir has every acknowledged write and an
index that did not go back."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from dnsdisco.catalog.model import PASSING
from dnsdisco.catalog.store import Store

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Four concurrent writers (so writes share group commits) mixing service registrations, check
# updates and KV puts. A line is printed only after the write's await returned: an ACK.
CHILD = r"""
import asyncio, sys
from dnsdisco.catalog.definition import decode_service_definition
from dnsdisco.catalog.store import Store

async def main(data_dir):
    store = Store(datacenter="dc1", node_name="n1", node_address="127.0.0.1", data_dir=data_dir)
    await store.open()
    print("OPEN", store.index, flush=True)

    async def writer(w):
        i = 0
        while True:
            name = f"w{w}-{i}"
            if i % 3 == 0:
                svc, checks = decode_service_definition(
                    {"Name": "web", "ID": name, "Port": 1000 + i, "Check": {"TTL": "1h"}},
                    node="n1", enable_script_checks=False)
                await store.register_service(svc, checks)
                kind = "svc"
            elif i % 3 == 1:
                await store.set_check_status("n1", f"service:w{w}-{i - 1}", "passing", name)
                kind = "check"
            else:
                await store.kv_put(f"k/{name}", name.encode())
                kind = "kv"
            print("ACK", kind, name, store.index, flush=True)
            i += 1

    await asyncio.gather(*(writer(w) for w in range(4)))

asyncio.run(main(sys.argv[1]))
"""


async def test_kill_9_loses_no_acknowledged_write(tmp_path):
    data_dir = str(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, data_dir, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    acks: list[tuple[str, str, int]] = []
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first.startswith(b"OPEN"), first
        while len(acks) < 300:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the writer died on its own"
            _, kind, name, index = line.decode().split()
            acks.append((kind, name, int(index)))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        # ACKs already in the pipe were acknowledged before the kill: they count too.
        rest = await proc.stdout.read()
        await proc.wait()
    for line in rest.decode().splitlines():
        if line.startswith("ACK"):
            _, kind, name, index = line.split()
            acks.append((kind, name, int(index)))
    assert proc.returncode == -signal.SIGKILL

    store = Store(datacenter="dc1", node_name="n1", node_address="127.0.0.1", data_dir=data_dir)
    await store.open()
    try:
        assert {k for k, _, _ in acks} == {"svc", "check", "kv"}
        for kind, name, _ in acks:
            if kind == "svc":
                assert store.service("n1", name) is not None, name
            elif kind == "check":
                w, i = name[1:].split("-")
                check = store.check("n1", f"service:w{w}-{int(i) - 1}")
                assert check is not None and (check.status, check.output) == (PASSING, name), name
            else:
                entry = store.kv_get(f"k/{name}")
                assert entry is not None and entry.value == name.encode(), name
        top = max(index for _, _, index in acks)
        assert store.index >= top  # the index never goes back across a crash
        before = store.index
        assert await store.kv_put("after", b"restart") is True
        assert store.index == before + 1
    finally:
        await store.close()
