"""gRPC unary calls (h2c) through a real ``sidecar run`` against the same calls direct, and against
HTTP/1.1 requests through the same sidecar, paired in one run.

A ``grpcio`` server (raw-bytes handlers, its own threads) and one channel to it direct, one through the
sidecar's outbound listener (route-prefix ``/greeter/...``, policy on ``grpc.method``); an HTTP/1.1
upstream (``http.server``, keep-alive) reached through the same listener on one kept-alive connection.
Each round runs ``--calls`` sequential calls of each kind, then 100 gRPC calls at once on one channel
(100 concurrent streams on one HTTP/2 connection). Prints per round the median and p99 latency, the
latency gRPC adds, and the sidecar's CPU time per call (its process's utime + stime) for gRPC and for
HTTP/1.1: on a loaded machine the absolute figures move, the ratio between the two is the figure.

    python -m tests.bench.bench_grpc [--rounds 3] [--calls 2000]
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import yaml

from tests.bench.soak_mtls import Sidecar, free_port

SERVICE = "helloworld.Greeter"


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


def concurrent(call: grpc.UnaryUnaryMultiCallable, n: int = 100) -> float:
    start = time.perf_counter()
    for pending in [call.future(b"bench", timeout=30) for _ in range(n)]:
        pending.result()
    return time.perf_counter() - start


def ms(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000


def round_(direct: grpc.UnaryUnaryMultiCallable, through: grpc.UnaryUnaryMultiCallable, outbound: int, pid: int,
           calls: int) -> None:
    d = sequential(direct, calls)
    before = cpu_seconds(pid)
    t = sequential(through, calls)
    grpc_cpu = cpu_seconds(pid) - before
    before = cpu_seconds(pid)
    h = http11(outbound, calls)
    http_cpu = cpu_seconds(pid) - before
    fan = {name: concurrent(call) for name, call in (("direct", direct), ("through", through))}
    print(f"  gRPC direct p50 {ms(d, 0.5):.3f} ms p99 {ms(d, 0.99):.3f} | through p50 {ms(t, 0.5):.3f} ms "
          f"p99 {ms(t, 0.99):.3f} (adds {ms(t, 0.5) - ms(d, 0.5):.3f} ms) | HTTP/1.1 through p50 "
          f"{ms(h, 0.5):.3f} ms | sidecar CPU gRPC {grpc_cpu / calls * 1e6:.0f} us/call, HTTP/1.1 "
          f"{http_cpu / calls * 1e6:.0f} us/request | 100 at once: direct {fan['direct'] * 1000:.0f} ms, "
          f"through {fan['through'] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    server, port = greeter()
    upstream = plain()
    rules = [{"id": "greet", "direction": "outbound", "upstream": "greeter", "effect": "allow",
              "when": {"expr": 'grpc.method == "SayHello"'}},
             {"id": "plain", "direction": "outbound", "upstream": "plain", "effect": "allow"}]
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(Path(tmp), free_port(), rules=rules,
                          upstreams={"greeter": {"url": f"http://127.0.0.1:{port}", "protocol": "grpc"},
                                     "plain": {"url": f"http://127.0.0.1:{upstream.server_address[1]}"}})
        config = yaml.safe_load(sidecar.config.read_text())
        config["logging"] = {"level": "warning"}
        sidecar.config.write_text(yaml.safe_dump(config))
        sidecar.start()
        assert sidecar.process is not None
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as d, \
                    grpc.insecure_channel(f"127.0.0.1:{sidecar.ports['outbound']}") as t:
                direct = d.unary_unary(f"/{SERVICE}/SayHello")
                through = t.unary_unary(f"/greeter/{SERVICE}/SayHello")
                sequential(direct, 200), sequential(through, 200)  # warm both connections
                print(f"{args.calls} sequential calls of each kind per round, then 100 gRPC calls at once")
                for _ in range(args.rounds):
                    round_(direct, through, sidecar.ports["outbound"], sidecar.process.pid, args.calls)
        finally:
            sidecar.stop()
            server.stop(0)
            upstream.shutdown()


if __name__ == "__main__":
    main()
