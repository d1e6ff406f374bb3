"""Health and metrics listeners: liveness, readiness, JWKS, discovery, Prometheus.

They see the sidecar through :class:`sidecar.control.Control` only.

Health is served by :class:`HealthThread`, on a thread and event loop of its own: a burst of a thousand
connections on a data listener keeps the data loop busy for seconds (each iteration parses and refuses
hundreds of requests), and a ``/readyz`` waiting its turn there took up to 1.4 s. Its answers read plain
attributes of the running sidecar (no await on the data loop), and it reports that loop stalled once it
has not run for ``STALLED``: a probe that used to time out on a stuck loop still fails.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from sidecar.control import Control
from sidecar.fields import ListenAddress

PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALLED = 1.0  # seconds the data loop may not run before health says so: a probe's usual timeout


def build(sidecar: Control) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        if sidecar.loop_silent_for >= STALLED:
            return web.json_response({"status": "stalled"}, status=503)
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if sidecar.loop_silent_for >= STALLED:
            return web.json_response({"status": "not_ready", "reason": "stalled"}, status=503)
        if sidecar.ready:
            return web.json_response({"status": "ready", "policy_version": sidecar.policy_version})
        reason = "draining" if sidecar.draining else "starting"
        return web.json_response({"status": "not_ready", "reason": reason}, status=503)

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(sidecar.signer.jwks(), headers={"Cache-Control": "max-age=300"})

    async def discovery(request: web.Request) -> web.Response:
        issuer = sidecar.config.identity.issuer
        if issuer is None:
            raise web.HTTPNotFound()
        return web.json_response({
            "issuer": issuer,
            "jwks_uri": issuer.rstrip("/") + "/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": [sidecar.signer.key.algorithm],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        })

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    return app


def build_metrics(sidecar: Control) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = sidecar.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": PROM_CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


class HealthThread:
    """An aiohttp application served on a thread and event loop of its own (see the module's docstring)."""

    def __init__(self, app: web.Application, listen: ListenAddress) -> None:
        self._app, self._listen = app, listen
        self._bound = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sidecar-health", daemon=True)
        self.port = 0

    async def start(self) -> int:
        """Listening when it returns (its port), or the bind's error raised here."""
        self._thread.start()
        await asyncio.to_thread(self._bound.wait)
        if self._failed is not None:
            raise self._failed
        return self.port

    async def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), which raises it on the data loop
            self._failed = exc
        finally:
            self._bound.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._listen.host, self._listen.port, reuse_address=True)
            await site.start()
            self.port = runner.addresses[0][1]
            self._bound.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
