"""gRPC unary calls (h2c) through a real ``sidecar run`` against the same calls direct, and against
HTTP/1.1 requests through the same sidecar, paired in one run.

A ``grpcio`` server (raw-bytes handlers, its own threads) and one channel to it direct, one through the
sidecar's outbound listener (route-prefix ``/greeter/...``, policy on ``grpc.method``); an HTTP/1.1
upstream (``http.server``, keep-alive) reached through the same listener on one kept-alive connection.
Each round runs ``--calls`` sequential calls of each kind, then ``--fan-batches`` batches of 100 gRPC
calls at once on one channel (100 concurrent streams on one HTTP/2 connection), direct and through.
Prints per round the median and p99 latency, the latency gRPC adds, and the sidecar's CPU time per call
(its process's utime + stime) for gRPC and for HTTP/1.1: on a loaded machine the absolute figures move,
the ratio between the two is the figure; then the 100-at-once row: each call's p50/p99 from the batch's
start, calls per second, and errors (a call that did not answer).

After the rounds, memory per open stream: ``--open`` counts (100, 500, 1000 by default) of
server-streaming calls that stay open (a ``grpc.aio`` server answers one message and holds each call
until the client cancels it), 100 per channel (each its own HTTP/2 connection to the sidecar, which caps
128 streams per connection) and per upstream (the sidecar's HTTP/2 client opens at most 100 streams on
its one connection to an upstream, so each channel has its own upstream entry, every one the same
server). The sidecar's RSS and FDs before, with all open (KiB per open stream), and after cancelling
them all and the server seeing every call end (RSS back near its base: the leak check).

    python -m tests.bench.bench_grpc [--rounds 3] [--calls 2000] [--fan-batches 5] [--open 100 500 1000]
        [--cycles 12]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import yaml

from tests.bench.bench_upload_memory import rss_kib
from tests.bench.soak_mtls import Sidecar, free_port

SERVICE = "helloworld.Greeter"
PER_CHANNEL = 100  # open calls per channel, and so per upstream entry (the sidecar's HTTP/2 client's limit)
HOLD_UPSTREAMS = 10  # upstream entries hold0..hold9, all the same holding server: up to 1000 open calls


def greeter() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "SayHello": grpc.unary_unary_rpc_method_handler(lambda request, context: b"hello " + request)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class Plain(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no delayed-ACK wait between them

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b"hello bench")

    def log_message(self, *args: object) -> None:
        pass


def plain() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def http11(port: int, n: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        connection.request("GET", "/plain/x")
        connection.getresponse().read()
        times.append(time.perf_counter() - start)
    connection.close()
    return times


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


def sequential(call: grpc.UnaryUnaryMultiCallable, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call(b"bench", timeout=10)
        times.append(time.perf_counter() - start)
    return times


def concurrent(call: grpc.UnaryUnaryMultiCallable, batches: int, n: int = 100) -> tuple[list[float], float, int]:
    """``batches`` times ``n`` calls at once: each answered call's latency from its batch's start, the
    wall time of all batches, and the calls that failed."""
    times: list[float] = []
    errors = 0
    wall = 0.0
    for _ in range(batches):
        start = time.perf_counter()
        pending = [call.future(b"bench", timeout=30) for _ in range(n)]
        for future in pending:
            future.add_done_callback(lambda f, start=start: times.append(time.perf_counter() - start)
                                     if f.exception() is None else None)
        for future in pending:
            errors += future.exception() is not None
        wall += time.perf_counter() - start
    return times, wall, errors


def ms(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000


@dataclass
class Subject:
    """One sidecar under test: its process and a channel through its outbound listener."""

    name: str
    sidecar: Sidecar
    channel: grpc.Channel

    @property
    def pid(self) -> int:
        assert self.sidecar.process is not None
        return self.sidecar.process.pid

    @property
    def through(self) -> grpc.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(f"/greeter/{SERVICE}/SayHello")


def measure(subject: Subject, direct_p50: float, calls: int, batches: int) -> dict[str, float]:
    """One subject's figures in this round: sequential gRPC (latency, CPU per call), HTTP/1.1 through the
    same listener (CPU per request), and ``batches`` of 100 calls at once (latency, calls/s, CPU per call)."""
    pid, through = subject.pid, subject.through
    before = cpu_seconds(pid)
    t = sequential(through, calls)
    grpc_cpu = (cpu_seconds(pid) - before) / calls * 1e6
    before = cpu_seconds(pid)
    http11(subject.sidecar.ports["outbound"], calls)
    http_cpu = (cpu_seconds(pid) - before) / calls * 1e6
    before = cpu_seconds(pid)
    times, wall, errors = concurrent(through, batches)
    fan_cpu = (cpu_seconds(pid) - before) / max(1, len(times)) * 1e6
    print(f"  {subject.name:8} gRPC p50 {ms(t, 0.5):.3f} ms p99 {ms(t, 0.99):.3f} (adds {ms(t, 0.5) - direct_p50:.3f}) | "
          f"sidecar CPU gRPC {grpc_cpu:.0f} us/call, HTTP/1.1 {http_cpu:.0f} us/request | 100 at once: p50 "
          f"{ms(times, 0.5):.1f} ms p99 {ms(times, 0.99):.1f} ms, {len(times) / wall:.0f} calls/s, {fan_cpu:.0f} us/call "
          f"CPU, {errors} errors of {batches * 100}")
    return {"grpc": grpc_cpu, "http11": http_cpu, "fan": fan_cpu}


def round_(direct: grpc.UnaryUnaryMultiCallable, subjects: list[Subject], calls: int, batches: int,
           rounds: list[dict[str, dict[str, float]]]) -> None:
    d = sequential(direct, calls)
    times, wall, errors = concurrent(direct, batches)
    print(f"  direct   gRPC p50 {ms(d, 0.5):.3f} ms p99 {ms(d, 0.99):.3f} | 100 at once: p50 {ms(times, 0.5):.1f} ms "
          f"p99 {ms(times, 0.99):.1f} ms, {len(times) / wall:.0f} calls/s, {errors} errors of {batches * 100}")
    order = subjects if len(rounds) % 2 == 0 else subjects[::-1]  # alternated: neither always runs first
    rounds.append({s.name: measure(s, ms(d, 0.5), calls, batches) for s in order})


def ratios(rounds: list[dict[str, dict[str, float]]], new: str, base: str) -> None:
    """Per figure, ``new``'s CPU over ``base``'s, paired within each round: the median and the range."""
    print(f"paired ratios, {new} / {base}, over {len(rounds)} rounds (median, min-max):")
    for figure, label in (("grpc", "gRPC unary CPU/call"), ("fan", "100 at once CPU/call"),
                          ("http11", "HTTP/1.1 CPU/request")):
        values = sorted(r[new][figure] / r[base][figure] for r in rounds if r[base][figure])
        if values:
            print(f"  {label:22} {statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f}); {new} "
                  f"{statistics.median(r[new][figure] for r in rounds):.0f} us, {base} "
                  f"{statistics.median(r[base][figure] for r in rounds):.0f} us")
    for name in (new, base):
        values = sorted(r[name]["grpc"] / r[name]["http11"] for r in rounds if r[name]["http11"])
        if values:
            print(f"  {name}: gRPC unary / HTTP/1.1 CPU {statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Holder:
    """A ``grpc.aio`` server on its own thread and loop: ``Hold`` answers one message, then holds the call
    open until the client cancels it (a coroutine per call, no thread). ``open`` counts the calls held."""

    def __init__(self) -> None:
        self.open = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.ports: list[int] = []
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Hold": grpc.unary_stream_rpc_method_handler(self.hold)}),))
        self.ports = [self.server.add_insecure_port("127.0.0.1:0")]
        await self.server.start()

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.open += 1
        try:
            yield b"open"
            await asyncio.Event().wait()  # until the call is cancelled
        finally:
            self.open -= 1

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll ``condition`` (a state of another process or thread, no event to wait on) for ``seconds`` at most."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} within {seconds:.0f}s")
        time.sleep(0.05)


def open_streams(outbound: int, pid: int, holder: Holder, counts: list[int], cycles: int) -> None:
    """Per count: open that many held calls through the sidecar, RSS and FDs with them open, then cancel
    them all and read both again once the server saw every call end and the FDs are back. A first pass
    of all the calls the upstreams take opens the sidecar's upstream connections (they stay pooled) and
    its one-time allocations, outside the figures. Then ``cycles`` more rounds of the largest count, the
    RSS after each: whether it levels off."""
    print(f"open server-streaming calls through the sidecar, {PER_CHANNEL} per channel (own connection) and upstream")
    hold_calls(outbound, pid, holder, PER_CHANNEL * HOLD_UPSTREAMS, pooled=HOLD_UPSTREAMS)
    for count in counts:
        base_rss, base_fds = rss_kib(pid), fds(pid)
        errors, open_rss, open_fds = hold_calls(outbound, pid, holder, count)
        after_rss, after_fds = rss_kib(pid), fds(pid)
        print(f"  {count:5} open ({errors} failed): RSS {base_rss / 1024:.1f} -> {open_rss / 1024:.1f} MiB "
              f"= {(open_rss - base_rss) / max(1, count - errors):.1f} KiB per open stream; FDs {base_fds} -> "
              f"{open_fds} | all cancelled: RSS {after_rss / 1024:.1f} MiB ({after_rss - base_rss:+d} KiB), "
              f"FDs {after_fds}")
    largest = max(counts)
    after = []
    for _ in range(cycles):
        hold_calls(outbound, pid, holder, largest)
        after.append(rss_kib(pid))
    if cycles:
        print(f"  then {cycles} more times {largest} opened and cancelled, RSS after each (MiB): "
              + " ".join(f"{kib / 1024:.1f}" for kib in after)
              + " (grows while garbage waits for a full collection, flat once memory is reused; a leak keeps growing)")


def hold_calls(outbound: int, pid: int, holder: Holder, count: int, *, pooled: int = 0) -> tuple[int, int, int]:
    """``count`` held calls open at once, then all cancelled and their channels closed, until the server
    saw each end and the sidecar's FDs are back to where they were (plus ``pooled`` upstream connections it
    may open and keep). The calls that failed, and the sidecar's RSS (KiB) and FDs while all were open."""
    base_fds = fds(pid)
    channels = [grpc.insecure_channel(f"127.0.0.1:{outbound}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(-(-count // PER_CHANNEL))]
    calls = [channels[i // PER_CHANNEL].unary_stream(f"/hold{i // PER_CHANNEL}/{SERVICE}/Hold")(b"x", timeout=300)
             for i in range(count)]
    errors = 0
    for call in calls:
        try:
            errors += next(call) != b"open"
        except grpc.RpcError:
            errors += 1
    until(lambda: holder.open == count - errors, f"the server holding {count - errors} calls")
    open_rss, open_fds = rss_kib(pid), fds(pid)
    for call in calls:
        call.cancel()
    until(lambda: holder.open == 0, "every held call ending at the server")
    for channel in channels:
        channel.close()
    until(lambda: fds(pid) <= base_fds + pooled, f"the sidecar's FDs back to {base_fds}")
    return errors, open_rss, open_fds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--fan-batches", type=int, default=5, help="batches of 100 calls at once per round")
    parser.add_argument("--open", type=int, nargs="*", default=[100, 500, 1000],
                        help=f"open calls to hold, at most {PER_CHANNEL * HOLD_UPSTREAMS}")
    parser.add_argument("--cycles", type=int, default=12, help="more open-and-cancel rounds of the largest --open")
    parser.add_argument("--baseline", type=Path, help="a source tree (e.g. a worktree of main) whose sidecar runs "
                                                      "beside this one, every figure of both in each round")
    args = parser.parse_args()
    if any(count > PER_CHANNEL * HOLD_UPSTREAMS for count in args.open):
        parser.error(f"--open: at most {PER_CHANNEL * HOLD_UPSTREAMS}")
    server, port = greeter()
    upstream = plain()
    holder = Holder()
    rules = [{"id": "greet", "direction": "outbound", "upstream": "greeter", "effect": "allow",
              "when": {"expr": 'grpc.method == "SayHello"'}},
             {"id": "plain", "direction": "outbound", "upstream": "plain", "effect": "allow"},
             *({"id": f"hold{i}", "direction": "outbound", "upstream": f"hold{i}", "effect": "allow",
                "grpc": {"methods": ["Hold"]}} for i in range(HOLD_UPSTREAMS))]
    holding = {f"hold{i}": {"url": f"http://127.0.0.1:{holder.ports[0]}", "protocol": "grpc"}
               for i in range(HOLD_UPSTREAMS)}
    upstreams = {"greeter": {"url": f"http://127.0.0.1:{port}", "protocol": "grpc"},
                 "plain": {"url": f"http://127.0.0.1:{upstream.server_address[1]}"}, **holding}
    with tempfile.TemporaryDirectory() as tmp:
        sources = [("sidecar", None)] + ([("baseline", args.baseline)] if args.baseline else [])
        subjects = []
        try:
            for name, source in sources:
                folder = Path(tmp) / name
                folder.mkdir()
                sidecar = Sidecar(folder, free_port(), rules=rules, upstreams=upstreams)
                config = yaml.safe_load(sidecar.config.read_text())
                config["logging"] = {"level": "warning"}
                sidecar.config.write_text(yaml.safe_dump(config))
                sidecar.start(source=source)
                subjects.append(Subject(name, sidecar, grpc.insecure_channel(
                    f"127.0.0.1:{sidecar.ports['outbound']}", options=[("grpc.use_local_subchannel_pool", 1)])))
            with grpc.insecure_channel(f"127.0.0.1:{port}") as d:
                direct = d.unary_unary(f"/{SERVICE}/SayHello")
                sequential(direct, 200)
                for subject in subjects:
                    sequential(subject.through, 200)  # warm both connections
                print(f"{args.calls} sequential calls of each kind per round, then {args.fan_batches} batches "
                      f"of 100 gRPC calls at once{'; baseline from ' + str(args.baseline) if args.baseline else ''}")
                rounds: list[dict[str, dict[str, float]]] = []
                for _ in range(args.rounds):
                    round_(direct, subjects, args.calls, args.fan_batches, rounds)
                if args.baseline:
                    ratios(rounds, "sidecar", "baseline")
            for subject in subjects:
                subject.channel.close()
                if args.open:
                    print(f"{subject.name}:")
                    open_streams(subject.sidecar.ports["outbound"], subject.pid, holder, args.open, args.cycles)
        finally:
            for subject in subjects:
                subject.sidecar.stop()
            server.stop(0)
            upstream.shutdown()
            holder.stop()

if __name__ == "__main__":
    main()
