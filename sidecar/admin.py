"""The admin API (loopback only): every call needs the bearer token of ``admin.token_file``.

The agent shares the pod's loopback, so the listener address alone proves nothing; the
token file lives on a volume mounted only into the sidecar container.

    POST /reload                      re-read policy (and identity, interception CA) files
    POST /revocations                 {"kind", "id", "ttl"}: effective before it returns
                                      kind credential: id is a credential id (jti or keyed hash, as
                                      logged) or a credential name from the config (all of its tokens)
    GET  /revocations                 DELETE /revocations/{rid}
    GET  /inventory                   identities, credentials held, open tasks; ?scope=fleet: every
                                      sidecar registered in the bus's Redis, live or stale (``sidecar.fleet``)
    POST /tasks                       {"subject_token" | "principal", "trigger", "ttl"} -> 201 {"id", "expires_at"}
    DELETE /tasks/{id}
    GET  /approvals                   requests held by require_approval (``sidecar.approvals``)
    POST /approvals/{id}              {"approve": true|false}, with an X-Approver-Token JWT

The routes see the sidecar through :class:`sidecar.control.Control` only.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from sidecar.control import Control
from sidecar.errors import IdentityRefused, Refusal, RequestRefused
from sidecar.fields import format_duration, parse_duration
from sidecar.inventory import iso_utc
from sidecar.reload import Reloaded
from sidecar.revocation import KINDS
from sidecar.server import error_response

log = structlog.get_logger("sidecar.admin")
MAX_REVOCATION_TTL = 30 * 86400.0


def ensure_token(path: Path) -> str:
    """The admin token: read, or generated (0600) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    if path.stat().st_mode & 0o077:  # readable by others: tighten it, or say so where it cannot be
        try:
            path.chmod(0o600)
        except OSError:
            log.warning("admin_token_file_readable", path=str(path), mode=oct(path.stat().st_mode & 0o777),
                        expected="0600, on a volume mounted only into the sidecar container")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"admin: token file {path} holds a token shorter than 16 characters")
    return token


def _auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            log.warning("admin_unauthorized", path=request.path, method=request.method)
            return error_response(Refusal("unauthorized", "admin: a valid admin bearer token is required"))
        try:
            return await handler(request)
        except Refusal as refusal:
            return error_response(refusal)
        except web.HTTPNotFound:
            return error_response(Refusal("not_found", f"admin: no such endpoint: {request.method} {request.path}"))
        except web.HTTPMethodNotAllowed:
            return error_response(Refusal("not_found", f"admin: {request.method} is not supported on "
                                                       f"{request.path}"))
    return middleware


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise RequestRefused("bad_request", "admin: expected a JSON object body") from None
    if not isinstance(body, dict):
        raise RequestRefused("bad_request", "admin: expected a JSON object body")
    return body


def _ttl(body: dict[str, Any], default: str, maximum: float) -> float:
    try:
        ttl = parse_duration(body.get("ttl", default))
    except (ValueError, TypeError):
        raise RequestRefused("bad_request", "admin: ttl must be a duration such as 10m or 24h") from None
    if ttl <= 0 or ttl > maximum:
        raise RequestRefused("bad_request", f"admin: ttl must be positive and at most {format_duration(maximum)}")
    return ttl


def build(sidecar: Control) -> web.Application:
    token = ensure_token(sidecar.config.admin.token_file)
    app = web.Application(middlewares=[_auth_middleware(token)], client_max_size=1024 * 1024)
    routes = AdminRoutes(sidecar)
    app.router.add_post("/reload", routes.reload)
    app.router.add_post("/revocations", routes.revoke)
    app.router.add_get("/revocations", routes.revocations)
    app.router.add_delete("/revocations/{rid:.+}", routes.unrevoke)  # agent ids contain "/"
    app.router.add_get("/inventory", routes.inventory)
    app.router.add_post("/tasks", routes.open_task)
    app.router.add_delete("/tasks/{id}", routes.end_task)
    app.router.add_get("/approvals", routes.approvals)
    app.router.add_post("/approvals/{id}", routes.decide)
    return app


def reload_response(results: tuple[Reloaded, ...], policy_version: str) -> web.Response:
    """200 when every reload succeeded; 422 naming each failure (the last good state of each stays)."""
    errors = [error for result in results for error in result.errors]
    if errors:
        return web.json_response({"error": "reload_failed", "message": "\n".join(errors),
                                  "policy_version": policy_version}, status=422)
    return web.json_response({"status": "reloaded", "policy_version": policy_version})


class AdminRoutes:
    def __init__(self, sidecar: Control) -> None:
        self.sidecar = sidecar

    async def reload(self, request: web.Request) -> web.Response:
        results = await self.sidecar.reload()
        return reload_response(results, self.sidecar.policy_version)

    async def revoke(self, request: web.Request) -> web.Response:
        body = await _json(request)
        kind, ident = body.get("kind"), body.get("id")
        if kind not in KINDS or not isinstance(ident, str) or not ident:
            raise RequestRefused("bad_request", f"admin: expected kind in {', '.join(KINDS)} and a non-empty id")
        ttl = _ttl(body, "24h", MAX_REVOCATION_TTL)
        entry = self.sidecar.revocations.add(kind, ident, ttl)
        return web.json_response(entry.as_dict(), status=201)

    async def revocations(self, request: web.Request) -> web.Response:
        return web.json_response({"revocations": [e.as_dict() for e in self.sidecar.revocations.list()]})

    async def unrevoke(self, request: web.Request) -> web.Response:
        if not self.sidecar.revocations.remove(request.match_info["rid"]):
            raise Refusal("not_found", "admin: no such revocation (ids look like task:<id>)")
        return web.json_response({"status": "deleted"})

    async def inventory(self, request: web.Request) -> web.Response:
        scope = request.query.get("scope", "local")
        if scope == "fleet":
            return web.json_response(await self.sidecar.fleet())
        if scope != "local":
            raise RequestRefused("bad_request", "admin: scope must be local or fleet")
        return web.json_response(self.sidecar.inventory())

    async def open_task(self, request: web.Request) -> web.Response:
        body = await _json(request)
        tasks_cfg = self.sidecar.config.tasks
        ttl = _ttl(body, format_duration(tasks_cfg.ttl), tasks_cfg.max_ttl)
        trigger = body.get("trigger")
        if trigger is not None and not isinstance(trigger, str):
            raise RequestRefused("bad_request", "admin: trigger must be a string")
        tasks, verifier = self.sidecar.tasks, self.sidecar.verifier
        if isinstance(body.get("subject_token"), str):
            if verifier is None:
                raise RequestRefused("bad_request", "admin: subject_token needs inbound.jwt issuers to verify it")
            token = await verifier.verify(body["subject_token"])
            task = tasks.open(principal=(token.issuer, token.subject), subject_token=token.token,
                                 delegation="delegated" if token.actor_type == "human" else "asserted",
                                 actor_type=token.actor_type, trigger=trigger, ttl=ttl, token_exp=token.expires_at,
                                 act_chain=token.act_chain)
        elif isinstance(body.get("principal"), str) and body["principal"]:
            task = tasks.open(principal=("admin", body["principal"]), subject_token=None, delegation="asserted",
                                 actor_type="human", trigger=trigger, ttl=ttl)
        else:
            raise RequestRefused("bad_request", "admin: expected subject_token (a JWT) or principal (a subject)")
        self.sidecar.metrics.active_tasks.set(tasks.open_count)
        log.info("task_opened", task_id=task.id, delegation=task.delegation, trigger=trigger, via="admin")
        return web.json_response({"id": task.id, "expires_at": iso_utc(task.expires_at),
                                  "delegation": task.delegation}, status=201)

    async def end_task(self, request: web.Request) -> web.Response:
        task = self.sidecar.tasks.end(request.match_info["id"])
        if task is None:
            raise Refusal("not_found", "admin: no such task")
        return web.json_response({"status": "ended"})

    async def approvals(self, request: web.Request) -> web.Response:
        return web.json_response({"approvals": self.sidecar.approvals.list()})

    async def decide(self, request: web.Request) -> web.Response:
        approver = await approver_of(self.sidecar, request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("approve"), bool):
            raise RequestRefused("bad_request", 'approvals: expected {"approve": true|false}')
        if not self.sidecar.approvals.decide(request.match_info["id"], body["approve"], approver):
            raise Refusal("not_found", "approvals: no pending approval with this id")
        return web.json_response({"status": "decided", "approve": body["approve"]})


async def approver_of(sidecar: Control, request: web.Request) -> dict[str, str]:
    """Verify X-Approver-Token: a human token for the approval audience, from a listed approver."""
    verifier = sidecar.verifier
    token = request.headers.get("X-Approver-Token")
    if verifier is None or not token:
        raise IdentityRefused("token_invalid", "approvals: an X-Approver-Token JWT from a configured issuer is required")
    verified = await verifier.verify(token, audience=sidecar.config.admin.approval_audience)
    if verified.actor_type != "human":
        raise Refusal("rule_denied", "approvals: approver tokens must be a human's")
    for entry in sidecar.config.admin.approvers:
        if entry.matches(verified.issuer, verified.subject):
            return {"iss": verified.issuer, "sub": verified.subject}
    raise Refusal("rule_denied", "approvals: this human is not an approver (admin.approvers)")
