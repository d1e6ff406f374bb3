"""An MCP server built with the official Python SDK (1.x ``FastMCP`` or 2.x ``MCPServer``) that demands a token
for itself: RFC 9728 protected-resource metadata, RFC 8707 audience. For tests.

Run with the Python of the environment whose SDK major is to be tested::

    python tests/peers/mcp_sdk/auth_server.py ISSUER JWKS_FILE CERT KEY

It serves the streamable-HTTP transport at ``/mcp`` over TLS (``CERT``/``KEY``) on 127.0.0.1 (a free port),
prints ``PORT <n>`` once listening, and runs until killed. A request without a valid token is answered 401
with ``WWW-Authenticate: Bearer ... resource_metadata=".../.well-known/oauth-protected-resource/mcp"``; a token
is valid when ISSUER signed it (keys in JWKS_FILE) for the audience ``https://127.0.0.1:<port>/mcp``. Tool:
``whoami`` (the token's client and audience).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import jwt
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from serving import serve

try:  # 2.x
    from mcp.server.mcpserver import Context, MCPServer as Server
except ImportError:  # 1.x
    from mcp.server.fastmcp import Context, FastMCP as Server  # type: ignore[no-redef]


class AudienceVerifier:
    """Accepts only ISSUER's JWTs for exactly this server's resource URL."""

    def __init__(self, issuer: str, jwks: dict[str, Any], resource: str) -> None:
        self.issuer, self.keys, self.resource = issuer, jwt.PyJWKSet.from_dict(jwks), resource

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = self.keys[jwt.get_unverified_header(token)["kid"]]
            claims = jwt.decode(token, key, algorithms=["ES256"], audience=self.resource, issuer=self.issuer)
        except (jwt.PyJWTError, KeyError):
            return None
        return AccessToken(token=token, client_id=str(claims.get("client_id", "")), scopes=[],
                           expires_at=claims.get("exp"), resource=self.resource)


async def main(issuer: str, jwks_file: str, cert: str, key: str) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    resource = f"https://127.0.0.1:{port}/mcp"
    with open(jwks_file) as f:
        verifier = AudienceVerifier(issuer, json.load(f), resource)
    server = Server("sdk-auth-server", token_verifier=verifier,
                    auth=AuthSettings(issuer_url=issuer, resource_server_url=resource, validate_token_resource=True))

    @server.tool()
    async def whoami(ctx: Context) -> str:  # type: ignore[type-arg]
        """Who the server was called as."""
        return f"called for {resource}"

    await serve(server.streamable_http_app(), sock, ssl_certfile=cert, ssl_keyfile=key)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:5])))
