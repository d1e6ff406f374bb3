"""``h2``'s own work for one unary gRPC call on both of the sidecar's legs, in one process, no sockets:
the sidecar's configuration (:func:`~sidecar.http2.side.h2_config`, :class:`~sidecar.http2.side.MemoEncoder`,
:func:`~sidecar.http2.side.encode_headers`) against ``h2``'s defaults (outbound normalization and
validation on, a plain ``hpack`` encoder), paired round by round.

Each call: the caller's HEADERS, DATA and empty END_STREAM DATA read by the listener's side and its
response (head, one message, trailers) sent; the request sent upstream (with a new ``traceparent`` and
``grpc-timeout`` every call, as the pipeline sends them) and the upstream's response read, its windows
given back. The figures are CPU µs per call (``time.thread_time``) for each of the four steps; what is
not here (the pipeline, the event loop, the socket) is in ``bench_grpc``.

    python -m tests.bench.bench_h2_frames [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import h2.config
import h2.connection
import h2.events
import hpack

from sidecar.http2.side import MemoDecoder, MemoEncoder, encode_headers, h2_config

Maker = Callable[[bool], h2.connection.H2Connection]
CALLER = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/greeter/helloworld.Greeter/SayHello"),
          (b":authority", b"127.0.0.1:5000"), (b"te", b"trailers"), (b"content-type", b"application/grpc"),
          (b"user-agent", b"grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"),
          (b"grpc-accept-encoding", b"identity, deflate, gzip")]
MESSAGE, ANSWER = b"\0\0\0\0\x05bench", b"\0\0\0\0\x0bhello bench"


def sidecar(client_side: bool) -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(config=h2_config(client_side=client_side))
    connection.encoder = MemoEncoder()
    if client_side:
        connection.decoder = MemoDecoder(connection.decoder.max_header_list_size)
    return connection


def defaults(client_side: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=client_side, header_encoding=None, validate_inbound_headers=client_side))


def pair(make: Maker, ours_client: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """Our end and a plain ``h2`` peer (standing for grpcio), past the preface and both SETTINGS."""
    ours, peer = make(ours_client), h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=not ours_client, header_encoding=None))
    ours.initiate_connection()
    peer.initiate_connection()
    peer.receive_data(ours.data_to_send())
    ours.receive_data(peer.data_to_send())
    peer.receive_data(ours.data_to_send())
    return ours, peer


def listener_leg(make: Maker, calls: int) -> tuple[float, float]:
    ours, peer = pair(make, False)
    read = sent = 0.0
    for i in range(calls):
        sid = peer.get_next_available_stream_id()
        peer.send_headers(sid, [*CALLER, (b"grpc-timeout", f"{19999 - i % 97}m".encode())])
        peer.send_data(sid, MESSAGE)
        peer.end_stream(sid)
        data = peer.data_to_send()
        start = time.thread_time()
        ours.receive_data(data)
        ours.acknowledge_received_data(len(MESSAGE), sid)
        read += time.thread_time() - start
        start = time.thread_time()
        ours.send_headers(sid, encode_headers({"content-type": "application/grpc",
                                               "grpc-accept-encoding": "identity, deflate, gzip"}, status="200"))
        ours.send_data(sid, ANSWER)
        ours.send_headers(sid, encode_headers({"grpc-status": "0"}), end_stream=True)
        out = ours.data_to_send()
        sent += time.thread_time() - start
        for event in peer.receive_data(out):
            if isinstance(event, h2.events.DataReceived):
                peer.acknowledge_received_data(event.flow_controlled_length, sid)
        if back := peer.data_to_send():
            ours.receive_data(back)
    return read / calls * 1e6, sent / calls * 1e6


def upstream_leg(make: Maker, calls: int) -> tuple[float, float]:
    ours, peer = pair(make, True)
    read = sent = 0.0
    for i in range(calls):
        sid = ours.get_next_available_stream_id()
        start = time.thread_time()
        block = encode_headers({"content-type": "application/grpc", "user-agent": CALLER[6][1].decode(),
                                "grpc-accept-encoding": "identity, deflate, gzip",
                                "grpc-timeout": f"{19999 - i % 97}m", "traceparent": f"00-{i:032x}-{i:016x}-01"},
                               method="POST", scheme="http", authority="127.0.0.1:5000",
                               path="/helloworld.Greeter/SayHello")
        ours.send_headers(sid, [*block, (b"te", b"trailers")])
        ours.send_data(sid, MESSAGE)
        ours.end_stream(sid)
        out = ours.data_to_send()
        sent += time.thread_time() - start
        peer.receive_data(out)
        peer.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                (b"grpc-accept-encoding", b"identity, deflate, gzip")])
        peer.send_data(sid, ANSWER)
        peer.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
        peer.acknowledge_received_data(len(MESSAGE), sid)
        data = peer.data_to_send()
        start = time.thread_time()
        ours.receive_data(data)
        ours.acknowledge_received_data(len(ANSWER), sid)
        ours.data_to_send()
        read += time.thread_time() - start
    return read / calls * 1e6, sent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    assert hpack.Encoder is not MemoEncoder
    totals: dict[str, list[float]] = {"sidecar": [], "defaults": []}
    for round_ in range(args.rounds):
        for name, make in (("sidecar", sidecar), ("defaults", defaults))[:: 1 if round_ % 2 == 0 else -1]:
            caller_read, caller_sent = listener_leg(make, args.calls)
            upstream_read, upstream_sent = upstream_leg(make, args.calls)
            total = caller_read + caller_sent + upstream_read + upstream_sent
            totals[name].append(total)
            print(f"  {name:8} read the call {caller_read:.0f} us, send its answer {caller_sent:.0f} | send upstream "
                  f"{upstream_sent:.0f}, read the upstream's answer {upstream_read:.0f} | h2 in all {total:.0f} us/call")
    ratios = sorted(s / d for s, d in zip(totals["sidecar"], totals["defaults"]))
    print(f"h2's work per call, sidecar / defaults, paired over {args.rounds} rounds: {statistics.median(ratios):.2f} "
          f"({ratios[0]:.2f}-{ratios[-1]:.2f}); {statistics.median(totals['sidecar']):.0f} against "
          f"{statistics.median(totals['defaults']):.0f} us")


if __name__ == "__main__":
    main()
