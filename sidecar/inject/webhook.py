"""The admission webhook over TLS: AdmissionReview v1 in, allowed + JSONPatch out; `sidecar inject` runs it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from sidecar.errors import ConfigInvalid
from sidecar.inject.patch import InjectRefused, already_injected, patch_for, wants_injection
from sidecar.inject.settings import InjectSettings, Json, load_settings, log

REVIEW_API = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 3 * 1024 * 1024  # etcd stores objects up to 1.5 MiB; reviews carry one
RELOAD_SECONDS = 30.0
SETTINGS = web.AppKey("inject_settings", InjectSettings)


class BadReview(ValueError):
    """A request body that is not an AdmissionReview v1 of a Pod."""


@dataclass(frozen=True, slots=True)
class Review:
    """The parts of an AdmissionReview request the webhook uses."""

    uid: str
    operation: str
    namespace: str
    pod: Json


def parse_review(body: bytes) -> Review:
    """The review in ``body``; :class:`BadReview` says what was expected otherwise."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"inject: expected a JSON AdmissionReview body ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise BadReview("inject: expected a JSON object")
    if doc.get("apiVersion") != REVIEW_API or doc.get("kind") != "AdmissionReview":
        raise BadReview(f"inject: expected apiVersion {REVIEW_API} and kind AdmissionReview")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("inject: expected a request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("inject: expected request.uid, a non-empty string")
    pod = request.get("object")
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod" or _kind(request) != "Pod":
        raise BadReview("inject: expected request.object to be a Pod")
    if not isinstance(pod.get("spec"), dict) or not isinstance(pod.get("metadata", {}), dict):
        raise BadReview("inject: expected a Pod with a spec")
    return Review(uid, str(request.get("operation", "CREATE")), str(request.get("namespace", "")), pod)


def _kind(request: Json) -> str | None:
    kind = request.get("kind")
    return kind.get("kind") if isinstance(kind, dict) else None


def mutate_review(review: Review, settings: InjectSettings) -> Json:
    """The AdmissionReview response for ``review``: unchanged, patched, or refused."""
    pod, name = review.pod, _pod_name(review)
    if review.operation != "CREATE" or not wants_injection(pod):
        return {"uid": review.uid, "allowed": True}
    if already_injected(pod):
        log.info("inject: %s already has the sidecar; unchanged", name)
        return {"uid": review.uid, "allowed": True}
    try:
        ops = patch_for(pod, settings)
    except InjectRefused as exc:
        log.warning("inject: refused %s: %s", name, exc)
        status = {"status": "Failure", "code": 403, "reason": "Forbidden", "message": str(exc)}
        return {"uid": review.uid, "allowed": False, "status": status}
    log.info("inject: injected the sidecar into %s (%d patch operations)", name, len(ops))
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return {"uid": review.uid, "allowed": True, "patchType": "JSONPatch", "patch": patch}


def _pod_name(review: Review) -> str:
    meta = review.pod.get("metadata") or {}
    name = meta.get("name") or f"{meta.get('generateName', '')}*"
    return f"{review.namespace or meta.get('namespace', '')}/{name}"


async def _mutate(request: web.Request) -> web.Response:
    try:
        review = parse_review(await request.read())
    except BadReview as exc:
        return web.json_response({"error": "bad_request", "message": str(exc)}, status=400)
    response = mutate_review(review, request.app[SETTINGS])
    return web.json_response({"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": response})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(settings: InjectSettings) -> web.Application:
    """The webhook application: ``POST /mutate`` and ``GET /healthz``."""
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[SETTINGS] = settings
    app.router.add_post("/mutate", _mutate)
    app.router.add_get("/healthz", _healthz)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9443`` for IPv6) as a host and a port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"inject: --listen expects HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def server_context(tls_cert: Path, tls_key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the API server's calls (it presents no client certificate)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls_cert, tls_key)
    return context


def _mtimes(*paths: Path) -> tuple[float, ...]:
    try:
        return tuple(path.stat().st_mtime for path in paths)
    except OSError:
        return ()


async def _reload_certificates(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a renewed serving certificate (cert-manager rotates the Secret); keep the old one on error."""
    seen = _mtimes(cert, key)
    while True:
        await asyncio.sleep(RELOAD_SECONDS)
        now = _mtimes(cert, key)
        if not now or now == seen:
            continue
        try:
            context.load_cert_chain(cert, key)
            seen = now
            log.info("inject: reloaded the serving certificate %s", cert)
        except (OSError, ssl.SSLError) as exc:
            log.warning("inject: cannot reload %s, keeping the current certificate: %s", cert, exc)


async def _serve(app: web.Application, host: str, port: int, context: ssl.SSLContext,
                 tls_cert: Path, tls_key: Path) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, shutdown_timeout=10.0)
    await site.start()
    bound = runner.addresses[0][1]  # the port it got: listen may name port 0
    log.info("inject: serving https://%s:%d/mutate", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloader = asyncio.create_task(_reload_certificates(context, tls_cert, tls_key))
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        await runner.cleanup()


def run(listen: str, tls_cert: Path, tls_key: Path, config: Path | None) -> int:
    """Serve the webhook until SIGTERM; 0 after a clean stop, 2 on bad settings or TLS files."""
    try:
        settings = load_settings(config)
        host, port = parse_listen(listen)
        context = server_context(tls_cert, tls_key)
    except ConfigInvalid as exc:
        print(f"inject: invalid settings in {config}:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"inject: cannot start: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(build_app(settings), host, port, context, tls_cert, tls_key))
    return 0


def write_intercept_ca(state_dir: Path, publish: Path) -> Path:
    """Create (or keep) the interception CA in ``state_dir`` and copy its certificate to ``publish``."""
    from sidecar.identity.ca import InterceptionCA

    ca = InterceptionCA.load_or_create(None, None, state_dir)
    publish.parent.mkdir(parents=True, exist_ok=True)
    publish.write_text(ca.cert_pem)
    publish.chmod(0o644)
    return publish


def main(argv: list[str]) -> int:
    """``python -m sidecar.inject intercept-ca STATE_DIR CERT_OUT``: the injected CA init step."""
    if len(argv) != 3 or argv[0] != "intercept-ca":
        print("usage: python -m sidecar.inject intercept-ca STATE_DIR CERT_OUT", file=sys.stderr)
        return 2
    path = write_intercept_ca(Path(argv[1]), Path(argv[2]))
    print(f"inject: interception CA certificate published at {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
