"""Instructions per request of a whole proxy under callgrind: the figure that does not drift.

Seconds on a shared 2-vCPU machine move with every neighbour; instructions counted by valgrind do not
(repeatable to about 0.5 % here). Each subject runs under ``valgrind --tool=callgrind
--instr-atstart=no`` behind the bench's nginx; ``ab`` warms it up (1,500 requests, 8 at a time), then
counting is switched on for N more and off again. Start-up, imports and the warm-up are not counted.
System calls are not instructions: the CPU figures of ``bench_proxy`` stay the acceptance measure,
this one shows where a change moved the user-space work.

Subjects: ``sidecar`` (this tree, as built: compiled modules if ``sidecar/**/*.so`` are in place),
``bare`` and ``lean`` (tests/bench), and ``--baseline DIR`` (the sidecar of another checkout, e.g.
``git worktree add DIR HEAD~1``). ``--annotate`` keeps callgrind's files and prints the top of
``callgrind_annotate`` for the sidecar.

Run: ``python -m tests.bench.bench_instructions [--requests N] [--subjects sidecar,bare] [--baseline DIR]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench import bench_proxy as b

WARM_UP = 1500
CONCURRENCY = 8


def count(subject: str, root: Path, requests: int, tmp: Path, nginx_port: int) -> tuple[float, Path]:
    """(instructions per request, the callgrind output's directory) of one subject."""
    work = tmp / subject
    work.mkdir()
    port = b.free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "0"}
    if subject in ("sidecar", "baseline"):
        config, ports = b.sidecar_config(work, nginx_port)
        argv = ["-m", "sidecar", "run", "-c", str(config)]
        url = f"http://127.0.0.1:{ports['outbound']}/bench/v1/bench"
        ready = f"http://127.0.0.1:{ports['health']}/readyz"
    else:
        argv = ["-m", f"tests.bench.{subject}_proxy", "--listen", f"127.0.0.1:{port}",
                "--upstream", f"http://127.0.0.1:{nginx_port}"]
        url = ready = f"http://127.0.0.1:{port}/v1/bench"
    out = work / "callgrind.out"
    with open(work / "stdout", "wb") as stdout, open(work / "stderr", "wb") as stderr:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                                 sys.executable, *argv], stdout=stdout, stderr=stderr, cwd=root, env=env)
    try:
        b.wait_until(lambda: b.http_ok(ready), 300, subject, proc)
        subprocess.run(["ab", "-q", "-k", "-n", str(WARM_UP), "-c", str(CONCURRENCY), url],
                       stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], stdout=subprocess.DEVNULL, check=True)
        run = subprocess.run(["ab", "-q", "-k", "-n", str(requests), "-c", str(CONCURRENCY), url],
                             capture_output=True, text=True, check=True)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    failed = re.search(r"Failed requests:\s+(\d+)", run.stdout)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", run.stdout)
    if failed is None or failed.group(1) != "0" or non2xx is not None:
        raise RuntimeError(f"bench: {subject} failed requests under callgrind:\n{run.stdout[-2000:]}")
    totals = [int(line.split()[1]) for f in work.glob("callgrind.out*") for line in f.read_text().splitlines()
              if line.startswith(("summary:", "totals:"))]
    return max(totals) / requests, work


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.bench_instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="requests counted per subject (default 3000)")
    p.add_argument("--subjects", default="sidecar,bare", help="comma-separated: sidecar, bare, lean")
    p.add_argument("--baseline", type=Path, metavar="DIR", help="also count the sidecar of another checkout")
    p.add_argument("--annotate", action="store_true", help="print the sidecar's top functions (callgrind_annotate)")
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "ab", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is needed (apt-get install valgrind apache2-utils nginx)")
    root = Path(__file__).resolve().parents[2]
    subjects = [(s, root) for s in args.subjects.split(",")] + ([("baseline", args.baseline.resolve())]
                                                                 if args.baseline else [])
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as name:
        tmp = Path(name)
        nginx_port = b.free_port()
        nginx = b.start_nginx(tmp, nginx_port)
        try:
            for subject, tree in subjects:
                print(f"  {subject}: {args.requests} requests under callgrind", file=sys.stderr, flush=True)
                figures[subject], work = count(subject, tree, args.requests, tmp, nginx_port)
                if args.annotate and subject == "sidecar":
                    top = subprocess.run(["callgrind_annotate", str(work / "callgrind.out.1")],
                                         capture_output=True, text=True).stdout
                    print("\n".join(top.splitlines()[:60]))
        finally:
            b.stop(nginx)
    print(f"### instructions per request (callgrind, {args.requests} kept-alive requests, {CONCURRENCY} at a time)\n")
    print("| subject | instructions/request | vs bare |")
    print("|---|---|---|")
    for subject, n in figures.items():
        ratio = f"{n / figures['bare']:.3f}x" if "bare" in figures else "-"
        print(f"| {subject} | {n / 1000:.1f}k | {ratio} |")
    if "baseline" in figures and "sidecar" in figures:
        print(f"\nsidecar/baseline: {figures['sidecar'] / figures['baseline']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
