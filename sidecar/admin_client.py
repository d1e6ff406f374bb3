"""``sidecar revoke`` and ``sidecar inventory``: clients of the admin API (they read the token file)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from sidecar.config_model import Config


def _call(config: Config, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    try:
        token = config.admin.token_file.read_text().strip()
    except OSError as exc:
        print(f"error: cannot read admin token file {config.admin.token_file}: {exc.strerror}", file=sys.stderr)
        return 1, None
    listen = config.admin.listen
    address = f"127.0.0.1:{listen.port}" if listen.host in ("0.0.0.0", "") else str(listen)  # [::1]:port for IPv6
    request = urllib.request.Request(f"http://{address}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: admin API at {address} unreachable: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1, None


def revoke(config: Config, kind: str, ident: str, ttl: str) -> int:
    status, body = _call(config, "POST", "/revocations", {"kind": kind, "id": ident, "ttl": ttl})
    if status == 201:
        print(f"revoked {kind} {ident} (until {body['expires_at']:.0f}, id {body['rid']})")
        return 0
    if body is not None:
        print(f"error: {body.get('message', body)}", file=sys.stderr)
    return 1


def inventory(config: Config, *, fleet: bool = False) -> int:
    """The inventory as JSON; ``fleet``: every sidecar on the bus (exit 0 even when that view is
    unavailable: the JSON says why, and so does a warning on stderr)."""
    status, body = _call(config, "GET", "/inventory?scope=fleet" if fleet else "/inventory")
    if status != 200:
        if body is not None:
            print(f"error: {body.get('message', body)}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    if fleet and not body.get("available"):
        print(f"warning: the fleet view is unavailable: {body.get('reason')}", file=sys.stderr)
    return 0
