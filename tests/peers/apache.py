"""A real Apache httpd for tests: the upstream that echoes what it received, as deployed ones do.

Fixture ``apache`` -> :class:`Apache` (``.url``, ``.requests()``). Apache's own defaults do the
echoing: ``TraceEnable`` is on (a TRACE is answered with the request head as ``message/http``),
``DirectorySlash`` redirects ``/v1/files?q`` to ``/v1/files/?q`` with the query kept. On top,
the configuration below echoes what some upstreams echo: ``Header always echo`` repeats the
``X-API-Key`` request header, and ``/v1/page`` answers with ``Link``, ``Content-Location`` and
``Refresh`` headers that repeat the query, and ``/v1/error`` (a CGI script) answers 403 with an
S3-style ``SignatureDoesNotMatch`` XML body, ``Content-Length`` framed, that repeats the request's
``X-API-Key`` and ``X-Amz-Security-Token`` values, as S3's canonical request in that error does.
``requests()`` reads the access log: the method and target of every request that reached it.

Skipped when ``apache2`` is missing (a failure under ``CI=true``); install it with
``apt-get install -y --no-install-recommends apache2``. Import it into a test module with
``from tests.peers.apache import apache  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.redis import free_port

INSTALL_HINT = "apt-get install -y --no-install-recommends apache2"
MODULES = Path("/usr/lib/apache2/modules")
STARTUP_TIMEOUT_S = 10.0
LOG_WAIT_S = 5.0

CONFIG = """\
ServerRoot {root}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule dir_module {modules}/mod_dir.so
LoadModule headers_module {modules}/mod_headers.so
LoadModule rewrite_module {modules}/mod_rewrite.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule cgid_module {modules}/mod_cgid.so
ScriptSock {root}/cgid.sock
ScriptAlias /v1/error {root}/cgi/error
{user}
Listen 127.0.0.1:{port}
ServerName 127.0.0.1
PidFile {root}/httpd.pid
Mutex file:{root}
ErrorLog {root}/error.log
LogFormat "%m %U%q" request
CustomLog {root}/access.log request
DocumentRoot {root}/docs
Header always echo ^X-API-Key$
RewriteEngine On
RewriteRule ^ - [E=ECHO_QUERY:%{{QUERY_STRING}}]
<Location /v1/page>
  Header always set Link "</v1/page?%{{ECHO_QUERY}}e>; rel=\\"next\\""
  Header always set Content-Location "/v1/page?%{{ECHO_QUERY}}e"
  Header always set Refresh "0; url=/v1/page?%{{ECHO_QUERY}}e"
</Location>
"""
# S3's SignatureDoesNotMatch repeats the canonical request it computed: every signed header's value
ERROR_CGI = """#!/bin/sh
body="<?xml version=\\"1.0\\" encoding=\\"UTF-8\\"?>
<Error><Code>SignatureDoesNotMatch</Code><CanonicalRequest>GET
/v1/error

x-amz-security-token:$HTTP_X_AMZ_SECURITY_TOKEN
x-api-key:$HTTP_X_API_KEY
</CanonicalRequest></Error>"
printf 'Status: 403 Forbidden\\r\\nContent-Type: application/xml\\r\\nContent-Length: %d\\r\\n\\r\\n%s' "${{#body}}" "$body"
"""


def apache_binary() -> str:
    """The apache2 path; skip (or fail under CI=true) when it is not installed."""
    binary = shutil.which("apache2") or shutil.which("apache2", path="/usr/sbin")
    if binary is None or not MODULES.is_dir():
        message = f"apache2 is not installed ({INSTALL_HINT})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


class Apache:
    """One apache2 process in the foreground, serving a document root of its own."""

    def __init__(self, binary: str) -> None:
        # Apache's workers drop root for nobody: the root must be readable by them, not a 0700 tmp_path
        self.root = Path(tempfile.mkdtemp(prefix="sidecar-apache-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self._binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Apache:
        (self.root / "docs" / "v1" / "files").mkdir(parents=True)
        (self.root / "docs" / "v1" / "files" / "index.html").write_text("files\n")
        (self.root / "docs" / "v1" / "page").write_text("page\n")
        (self.root / "cgi").mkdir()
        (self.root / "cgi" / "error").write_text(ERROR_CGI.format())
        for path in self.root.rglob("*"):
            path.chmod(0o755 if path.is_dir() or path.parent.name == "cgi" else 0o644)
        user = "User nobody\nGroup nogroup" if os.getuid() == 0 else ""
        config = self.root / "httpd.conf"
        config.write_text(CONFIG.format(root=self.root, modules=MODULES, port=self.port, user=user))
        self.process = subprocess.Popen([self._binary, "-f", str(config), "-DFOREGROUND"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"apache: exited with {self.process.returncode}: {self._errors()}")
            if _accepts(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"apache: not listening on port {self.port} within {STARTUP_TIMEOUT_S}s")

    def requests(self, expected: int = 0) -> list[str]:
        """``METHOD target`` of every request that reached Apache, in order. Apache logs a request once
        its response is sent, so this waits (boundedly) for ``expected`` lines."""
        log = self.root / "access.log"
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            if len(lines) >= expected or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def _errors(self) -> str:
        err = self.process.stderr.read().decode(errors="replace") if self.process and self.process.stderr else ""
        log = self.root / "error.log"
        return (err + (log.read_text() if log.exists() else ""))[-800:]

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def apache() -> Iterator[Apache]:
    """A real Apache on a free loopback port; stopped at the end of the test."""
    server = Apache(apache_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()
