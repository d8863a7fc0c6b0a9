"""Run the atheris fuzz harnesses for a bounded time; exit non-zero on any crash.

``python3 tests/fuzz/run.py`` (what ``.ci/run`` does) gives the harnesses about 60 s in all;
``--seconds N`` changes the budget (split 2:1 between the packet and the HTTP-decoding harness),
and ``--only packet`` runs one. atheris is installed with pip when missing; if that fails the
run fails, loudly: a fuzz step that skips itself would look green while testing nothing.

New inputs found during the run go to a scratch directory (the committed seeds in
``corpus/<harness>`` are only read); a crashing input is written to ``--artifacts`` (default
``fuzz-artifacts/`` in the current directory) and its path printed, to be replayed with
``python3 tests/fuzz/fuzz_packet.py fuzz-artifacts/crash-...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ATHERIS = "atheris>=2.3"  # cp311 manylinux wheels on PyPI; keep in step with pyproject's "fuzz" extra

# harness -> (share of the time budget, extra libFuzzer flags)
HARNESSES = {
    "packet": (2, []),
    "definition": (1, [f"-dict={os.path.join(HERE, 'definition.dict')}"]),
}


def ensure_atheris() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    print(f"+ {sys.executable} -m pip install -q '{ATHERIS}'", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", ATHERIS])
    if done.returncode != 0 or importlib.util.find_spec("atheris") is None:
        sys.exit(f"fuzz: could not install {ATHERIS} for {sys.executable}; the fuzz step cannot run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("--only", choices=sorted(HARNESSES))
    parser.add_argument("--artifacts", default="fuzz-artifacts")
    args = parser.parse_args()
    ensure_atheris()
    chosen = [args.only] if args.only else list(HARNESSES)
    shares = sum(HARNESSES[h][0] for h in chosen)
    os.makedirs(args.artifacts, exist_ok=True)
    failed = []
    for name in chosen:
        share, flags = HARNESSES[name]
        seconds = max(1, args.seconds * share // shares)
        seeds = os.path.join(HERE, "corpus", name)
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
            cmd = [
                sys.executable, os.path.join(HERE, f"fuzz_{name}.py"),
                f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
                f"-artifact_prefix={os.path.join(args.artifacts, '')}", *flags, scratch, seeds,
            ]
            print(f"+ fuzz {name} for {seconds}s", flush=True)
            # libFuzzer chatters on stderr for every new input; keep the log and show its end.
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        lines = done.stdout.splitlines()
        tail = [line for line in lines if not line.startswith(("#", "INFO:", "WARNING:", '"', "stat::"))]
        stats = [line for line in lines if line.startswith("#") and ("DONE" in line or "INITED" in line)]
        print("\n".join(stats + tail[-60:]), flush=True)
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print(f"fuzz: FAILED: {', '.join(failed)} (inputs in {args.artifacts}/)", file=sys.stderr)
        return 1
    print(f"fuzz: {len(chosen)} harnesses ran {args.seconds}s without a crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
