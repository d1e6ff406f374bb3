"""Peers that misbehave on command, for the chaos harness: an upstream, a token endpoint, the agent.

Each is a real aiohttp server on 127.0.0.1 whose ``mode`` the harness switches while traffic runs.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from pathlib import Path

from aiohttp import web

from tests.identity.tokens import Key, ec_key, sign

UPSTREAM_MODES = ("normal", "reset", "slow", "cut", "half-open", "oversize")
TOKEN_MODES = ("normal", "down", "slow", "garbage", "error")
JWKS_MODES = ("normal", "down", "slow")


class Switchable:
    """A loopback server with a behaviour switch and a count of what reached it."""

    def __init__(self) -> None:
        self.mode = "normal"
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.ssl_context: ssl.SSLContext | None = None  # set before start(): served over HTTPS

    async def start(self) -> Switchable:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


SSE_EVENTS = 3


class Upstream(Switchable):
    """normal: 200 ``ok``; reset: the connection is aborted before a byte of answer; slow: the answer
    comes after ``slow_seconds`` (past the sidecar's first_byte); cut: the head and half the body,
    then the connection is aborted; half-open: the request is read and then nothing, neither an answer nor a
    close (a peer gone without a FIN), until the mode changes, when those connections are aborted; oversize: an
    answer whose head carries a header past the sidecar's 8,190-byte limit on a response field. A bearer token the token endpoint did not issue, or that expired, is refused
    401 ``invalid_token`` (a sidecar handing out a token past its lifetime is seen). In normal mode ``/sse`` streams SSE_EVENTS events (``data: n``) and
    ``/ws`` is a WebSocket that echoes each text message and closes with a close frame after one."""

    slow_seconds = 6.0  # past the first_byte the harness gives the sidecar (4 s)
    oversize_bytes = 9000  # one header value past the sidecar's MAX_RESPONSE_FIELD (8,190)

    def __init__(self, tokens: TokenEndpoint | None = None) -> None:
        super().__init__()
        self.tokens = tokens  # bearer tokens are checked against what it issued, and when they expire
        self._held: set[asyncio.Future[None]] = set()  # half-open: requests read and never answered

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        if value != "half-open":  # the held connections are aborted: the peer is back (with a RST)
            for held in getattr(self, "_held", ()):  # (none yet while Switchable.__init__ sets the first mode)
                held.cancel()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer and self.tokens is not None and not self.tokens.valid(bearer):
            return web.json_response({"error": "invalid_token"}, status=401)
        if self.mode == "normal" and request.path.endswith("/sse"):
            return await self._sse(request)
        if self.mode == "normal" and request.path.endswith("/ws"):
            return await self._echo(request)
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        if self.mode == "half-open":
            held = asyncio.get_running_loop().create_future()
            self._held.add(held)
            try:
                await held
            except asyncio.CancelledError:
                if request.transport is not None:
                    request.transport.abort()
                raise
            finally:
                self._held.discard(held)
        if self.mode == "oversize":
            return web.Response(text="ok", headers={"X-Padding": "p" * self.oversize_bytes})
        if self.mode == "cut":
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 500)
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.Response(text="ok")

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for n in range(SSE_EVENTS):
            await response.write(f"id: {n}\ndata: {n}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        message = await ws.receive()
        if message.type == web.WSMsgType.TEXT:
            await ws.send_str(message.data)
        await ws.close()
        return ws


class TokenEndpoint(Switchable):
    """An OAuth 2.0 token endpoint (client credentials) whose tokens live ``lifetime`` seconds.
    down: 503; slow: no answer within the client's timeout; garbage: 200 with a body that is not JSON;
    error: 400 invalid_client. Over HTTPS when given a ``ca_file`` (its CA is written there)."""

    lifetime = 8

    def __init__(self, ca_file: Path | None = None) -> None:
        super().__init__()
        self._issued: dict[str, float] = {}  # token -> when it expires (the monotonic clock: the harness's is true)
        if ca_file is not None:  # served over HTTPS (a trustme CA written to ca_file)
            import trustme

            ca = trustme.CA()
            ca.cert_pem.write_to_path(str(ca_file))
            self.ca_file = ca_file
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(self.ssl_context)

    def valid(self, token: str) -> bool:
        return self._issued.get(token, 0.0) > time.monotonic()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        if self.mode == "down":
            return web.Response(status=503, text="maintenance")
        if self.mode == "slow":
            await asyncio.sleep(30)
        if self.mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if self.mode == "error":
            return web.json_response({"error": "invalid_client"}, status=400)
        token = secrets.token_urlsafe(24)
        self._issued[token] = time.monotonic() + self.lifetime
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime})


class Agent(Switchable):
    """The agent behind the inbound listener: always 200."""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        return web.Response(text="agent ok")


class Issuer(Switchable):
    """A human's token issuer: its JWKS over HTTPS (a trustme CA written to ``ca_file``) and the keys it
    signs with. normal: ``/jwks`` publishes ``published``; down: the connection is aborted before a byte of
    answer; slow: no answer for 30 s (past the sidecar's 10 s fetch timeout). ``rotate()`` publishes a new key beside the old one and signs with both (the sidecar has not
    seen the new kid yet); ``retire()`` removes the old key from the JWKS and signs with the new one alone.
    ``token()`` is a fresh human token each call (its own jti and iat: the sidecar's verification cache does
    not answer for it); ``unknown_kid_token()`` is signed by a key the JWKS never published, under one kid
    (which the sidecar, once a good refresh found it absent, refuses without fetching again for 5 min), or,
    while ``new_strangers`` is set, under a kid new each call (each one the sidecar has not seen makes it try
    a refresh, at most once per 30 s: how a fault of the JWKS endpoint is met by the traffic)."""

    name = "https://idp.chaos.test"
    audience = "chaos-agent"

    def __init__(self, ca_file: Path) -> None:
        super().__init__()
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(ca_file))
        self.ca_file = ca_file
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self.ssl_context)
        self._generation = 0
        self.published: list[Key] = [ec_key("chaos-0")]
        self.signing: list[Key] = list(self.published)
        self._stranger = ec_key("never-published")
        self.new_strangers = False
        self._n = 0

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks"

    def rotate(self) -> None:
        self._generation += 1
        new = ec_key(f"chaos-{self._generation}")
        self.published = [*self.published, new]
        self.signing = list(self.published)

    def retire(self) -> None:
        self.published = self.published[-1:]
        self.signing = list(self.published)

    def token(self) -> tuple[str, str]:
        """A fresh human token and the kid of the key that signed it."""
        self._n += 1
        key = self.signing[self._n % len(self.signing)]
        return self._sign(key), key.kid

    def unknown_kid_token(self) -> str:
        if not self.new_strangers:
            return self._sign(self._stranger)
        self._n += 1
        return self._sign(self._stranger, kid=f"never-published-{self._n}")

    def _sign(self, key: Key, kid: str | None = None) -> str:
        now = int(time.time())
        return sign(key, {"iss": self.name, "sub": "alice@example.com", "aud": self.audience,
                          "client_id": "chaos-console", "iat": now, "exp": now + 300,
                          "jti": secrets.token_urlsafe(12)}, kid=kid or key.kid)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "down":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.mode == "slow":
            await asyncio.sleep(30)
        return web.json_response({"keys": [k.jwk for k in self.published]})


class Front:
    """A TCP relay in front of a peer (``target_port`` on 127.0.0.1), whose ``mode`` cuts it off as a network
    would. normal: bytes relayed both ways; partitioned: nothing relayed either way, on the connections open
    and on new ones, which are accepted and then hear nothing (a TLS handshake through it hangs at its first
    flight), and nothing is closed: what is held flows again once the mode is back to normal."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._mode = "normal"
        self._server: asyncio.base_events.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        if value == "normal":
            self._flowing.set()
        else:
            self._flowing.clear()

    async def start(self) -> Front:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._flowing.wait()  # partitioned: the connection is accepted and hears nothing
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()  # partitioned: held, neither delivered nor dropped
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.close()
