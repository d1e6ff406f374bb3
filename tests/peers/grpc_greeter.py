"""A real ``grpcio`` server upstream (its own threads, h2c): unary, server-, client- and bidi-streaming
methods by generic handlers and raw-bytes messages (no .proto build step), recording each call's metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest

SERVICE = "helloworld.Greeter"


class Greeter:
    """A grpcio server (its own threads, h2c) that records the metadata each call arrived with."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "SayHello": grpc.unary_unary_rpc_method_handler(self.say_hello),
            "SayMany": grpc.unary_stream_rpc_method_handler(self.say_many),
            "Admin": grpc.unary_unary_rpc_method_handler(self.say_hello),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Echo": grpc.unary_stream_rpc_method_handler(self.echo_key),
            "Remaining": grpc.unary_unary_rpc_method_handler(self.remaining),
        }),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})

    def say_hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen(context)
        return b"hello " + request

    def say_many(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(context)
        for i in range(3):
            yield b"%d %s" % (i, request)

    def collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._seen(context)
        return b"+".join(requests)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(context)
        for request in requests:
            yield b"re: " + request

    def echo_key(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """One message, then a status whose message (a trailer) repeats the API key the call carried."""
        self._seen(context)
        yield b"one"
        key = dict(context.invocation_metadata()).get("x-api-key", "")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad key {key}")

    def remaining(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The seconds left of the call's deadline as the server was told it (grpc-timeout), as text."""
        return repr(context.time_remaining()).encode()

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        raise AssertionError("unreachable")


@pytest.fixture
async def greeter() -> AsyncIterator[Greeter]:
    """A grpcio server on 127.0.0.1 (h2c), stopped at the end of the test."""
    server = Greeter()
    yield server
    server.server.stop(0)
