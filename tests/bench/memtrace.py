"""A test-only launcher: ``python -m sidecar ...`` under tracemalloc, a snapshot on each SIGUSR1.

    python -m tests.bench.memtrace DIR run -c sidecar.yaml     # as ``python -m sidecar run -c ...``
    kill -USR1 <pid>                                            # DIR/snap-<n>.pickle and DIR/snap-<n>.json
    python -m tests.bench.memtrace --compare DIR/snap-1.pickle DIR/snap-3.pickle

Nothing of this is in the product (no admin endpoint counts objects): the soak (``soak_long --trace-memory``)
starts the sidecar through it to find what grows. On SIGUSR1 (the handler runs on the main thread, the
loop's, between two bytecodes) it writes what the process holds: traced bytes, the collector's view
(objects tracked, per generation, how much a full collection would free: the garbage found is *not* kept,
so that the next snapshot is of what is reachable), the 40 commonest object types, and a tracemalloc
snapshot. ``--compare`` prints the allocation sites that grew most between two snapshots.
"""

from __future__ import annotations

import collections
import gc
import json
import pickle
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12


def main() -> int:
    if sys.argv[1] == "--compare":
        return compare(Path(sys.argv[2]), Path(sys.argv[3]))
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    shots = [0]

    def shoot(signum: int, frame: FrameType | None) -> None:
        shots[0] += 1
        began = time.perf_counter()
        traced_before, _ = tracemalloc.get_traced_memory()
        tracked_before = len(gc.get_objects())
        counts = gc.get_count()
        freed = gc.collect()
        traced, peak = tracemalloc.get_traced_memory()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        snapshot = tracemalloc.take_snapshot()
        with (out / f"snap-{shots[0]}.pickle").open("wb") as f:
            pickle.dump(snapshot, f)
        (out / f"snap-{shots[0]}.json").write_text(json.dumps({
            "traced_before_collect": traced_before, "traced": traced, "peak": peak,
            "tracked_before_collect": tracked_before, "gc_counts": counts, "collected": freed,
            "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(),
            "types": types.most_common(40), "seconds": time.perf_counter() - began}))

    signal.signal(signal.SIGUSR1, shoot)
    from sidecar.cli import main as sidecar_main

    return sidecar_main(sys.argv[2:])


def compare(first: Path, second: Path) -> int:
    a, b = (pickle.loads(p.read_bytes()) for p in (first, second))
    noise = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
    a, b = a.filter_traces(noise), b.filter_traces(noise)
    for key in ("lineno", "traceback"):
        print(f"-- grew most, by {key}")
        for stat in b.compare_to(a, key)[:15 if key == "lineno" else 6]:
            print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7} blocks  "
                  f"{stat.traceback.format()[-1].strip() if key == 'lineno' else ''}")
            if key == "traceback":
                for line in stat.traceback.format(limit=FRAMES):
                    print(f"      {line}")
    ja, jb = (json.loads(p.with_suffix(".json").read_text()) for p in (first, second))
    ta, tb = dict(ja["types"]), dict(jb["types"])
    print("-- object types that grew (after a full collection)")
    for name, n in sorted(tb.items(), key=lambda kv: kv[1] - ta.get(kv[0], 0), reverse=True)[:15]:
        print(f"{n - ta.get(name, 0):+8} {name} ({n})")
    for j, p in ((ja, first), (jb, second)):
        print(f"{p.name}: traced {j['traced_before_collect'] / 2**20:.1f} -> {j['traced'] / 2**20:.1f} MiB after "
              f"collecting {j['collected']} objects; gc counts {j['gc_counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
