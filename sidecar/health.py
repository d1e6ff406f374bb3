"""Health and metrics listeners: liveness, readiness, JWKS, discovery, Prometheus.

They see the sidecar through :class:`sidecar.control.Control` only."""

from __future__ import annotations

from aiohttp import web

from sidecar.control import Control

PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build(sidecar: Control) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
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
