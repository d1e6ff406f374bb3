"""The chaos harness: a real ``sidecar run`` under steady traffic while faults are injected one at a time.

    python -m tests.chaos.run                        # every fault
    python -m tests.chaos.run --only token-down,svid-garbage --fault-seconds 12
    python -m tests.chaos.run --rate 30 --keep-log /tmp/sidecar.out   # a loaded machine; keep the events

Set-up (all on 127.0.0.1, in a temporary directory): a ``sidecar run`` process (uvloop) with its SVID
in files it watches, an inbound mTLS listener in front of a loopback agent, outbound upstreams on a
misbehaving server (``plain`` with a static key, ``oauth`` with client-credentials tokens from a
misbehaving token endpoint over HTTPS, ``intercepted`` reached by CONNECT through the interception CA given
as files), a revocation bus on a real ``redis-server`` when one is installed, and a policy file it watches.
The token endpoint and Redis are reached through relays (``peers.Front``) that a fault can cut off.
The sidecar runs in a private mount namespace (``unshare -m``) whose ``state_dir`` is a small tmpfs, so
that it can be filled or made read-only for that process alone, under libfaketime (``LD_PRELOAD``, a
control file; the monotonic clock left alone) when Debian's ``faketime`` is installed, so that its wall
clock can be stepped, and with its stdout on a pipe the harness reads, so that the reader can stall.
Traffic: about 40 requests a second, round robin: an allowed GET on each upstream (``plain`` naming a
task opened at start, ``ttl`` 30m), a GET policy denies, an allowed inbound mTLS call, one carrying a fresh
human token (ES256, from an issuer whose JWKS the sidecar fetches over HTTPS), one whose token names a kid
the JWKS never published (refused ``token_invalid`` whatever the fault), an SSE stream, a
WebSocket echo, a CONNECT to a new host name each time (a leaf minted per host), an MCP ``initialize`` to
a server built with the MCP SDK (``tests/peers/mcp_sdk/server.py``, upstream ``tools``, ``protocol: mcp``)
and a GET a ``when.hours`` rule allows (judged by the sidecar's own clock: see HOURS_WINDOW). Each call is
one exchange: aiohttp's resend of an idempotent request after a connection ended unanswered is off.

Then several at once (``together``: a slow upstream, the token endpoint down, a garbage SVID, Redis
down and the JWKS endpoint down). Per fault: steady traffic, the fault for ``--fault-seconds``, the fault cleared, traffic until every
kind of request succeeds again. Printed per fault, and the exit status 1 if any promise broke:
- **lost**: requests that got no HTTP answer at all (must be 0; a refusal with its reason is an answer);
- **wrong**: decisions other than policy's (an allowed request refused by policy, a denied one served: 0);
- **recovery**: seconds from clearing the fault to every kind of request succeeding again;
- **events / exchanges**: trust-decision events written (plus those the log counted as dropped) against
  the exchanges the requests made (must be equal; a CONNECT's is that of the request in its tunnel);
- the refusals seen during the fault, by reason, against the ones the fault is expected to cause.
Faults that need what is not there (no root for ``unshare``, no libfaketime, no Redis) are left out, and
the run says so.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Awaitable, Callable

import aiohttp
import yaml

from tests.bench.soak_mtls import free_port
from tests.chaos.peers import SSE_EVENTS, Agent, Front, Issuer, TokenEndpoint, Upstream
from tests.harness import wait_ready

CALLER = "spiffe://sidecar.local/orchestrator"
OURS = "spiffe://sidecar.local/chaos-agent"
POLICY_DENIALS = frozenset({"no_matching_rule", "rule_denied", "condition_error"})
KINDS = ("plain", "oauth", "denied", "inbound", "human", "sse", "websocket", "connect", "mcp", "badkid", "hours")
# kinds always refused, with the status and reason that say so: anything else is a wrong decision
REFUSED = {"denied": (403, "rule_denied"), "badkid": (401, "token_invalid")}
# an 'hours' call (GET /plain/hours) is allowed by a when.hours window around the time the policy was written
# (HOURS_WINDOW either side, in UTC), refused no_matching_rule outside it: which one is judged by the time the
# sidecar itself read for that exchange (its event's ts, found by the call's own trace id), so that a clock
# stepped an hour, which leaves the window, must change the decision on the very next exchange
HOURS_WINDOW = 40  # minutes: an hour's step leaves it; a run refreshes it when it is older than HOURS_REFRESH
HOURS_REFRESH = 15 * 60.0
OUTSIDE_HOURS = (403, "no_matching_rule")
TRACE_TAG = 0xC4A05  # the first hex digits of every 'hours' call's trace id
RATE = 40.0  # requests a second, all kinds together
REQUEST_TIMEOUT = 15.0
IDLE = 5.0  # outbound.timeouts.idle: also how long the sidecar keeps an idle client connection
MCP_SERVER = Path(__file__).parents[1] / "peers" / "mcp_sdk" / "server.py"  # built with the MCP SDK installed
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "chaos",
                                                                                          "version": "1"}}}
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
STATE_BYTES = "4m"  # the sidecar's state_dir: a tmpfs this small, so that filling it is quick
HOSTS = itertools.count()  # CONNECT host names, new across faults too (a leaf cached by one is not reused)
TRACES = itertools.count(1)  # 'hours' calls' trace ids, new across faults too
DROPPED_EVENTS = 'sidecar_log_lines_dropped_total{kind="trust_decision"}'
LOG_BUFFER = 65536  # logging.buffer_bytes: small, so that a stalled stdout is felt within seconds


@dataclass
class Outcome:
    kind: str
    at: float
    status: int | None = None
    reason: str | None = None
    error: str | None = None
    ok: bool = False  # the answer was whole and what the upstream sent (an SSE stream, a WebSocket echo)
    kid: str | None = None  # a human token's: which of the issuer's keys signed it
    trace: str | None = None  # an 'hours' call's trace id (its traceparent), which its event carries
    due: tuple[int, str] | None = None  # an 'hours' call the sidecar's own clock put outside the window
    detail: str = ""  # a client-side error's message


@dataclass
class Clients:
    """What the traffic needs to talk to the sidecar: its ports, the caller's mTLS context, the context
    trusting the interception CA (CONNECT), the task the ``plain`` requests name, and the issuer of the
    human tokens inbound calls carry."""

    ports: dict[str, int]
    inbound_tls: ssl.SSLContext
    intercept_tls: ssl.SSLContext
    task: str
    issuer: Issuer


class Traffic:
    """Steady requests of every kind; each outcome kept with the time it was sent."""

    def __init__(self, clients: Clients, rate: float = RATE) -> None:
        self.clients, self.rate = clients, rate
        self.outcomes: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """No new requests; those in flight are answered (or time out) before the client session closes."""
        assert self._task is not None
        self._stopping.set()
        await self._task

    @property
    def exchanges(self) -> int:
        return len(self.outcomes)  # one trust decision each (a CONNECT's is its tunnel's request)

    async def _run(self) -> None:
        # the sidecar closes a kept-alive client connection idle for its outbound idle timeout (IDLE): a client
        # keeping one longer (aiohttp: 15 s) races that close, and a request sent as it happens is reset
        # unread (RFC 9112 §9.3.1 lets a server close an idle connection; a client resends only idempotent
        # requests, and not when resends are off). Kept for half that, as a well-behaved client would.
        connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=IDLE / 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            # aiohttp sends an idempotent request again, once, on a new connection when the first ended with no
            # answer (any ClientOSError or ServerDisconnectedError, not only a kept-alive connection's): one call
            # would be two exchanges with the sidecar, and a request dropped unanswered would be hidden by the
            # second. Off, as aiohttp's own test client has it: each call is one exchange, seen as it went.
            session._retry_connection = False
            n = 0
            while not self._stopping.is_set():
                task = asyncio.ensure_future(self._one(session, KINDS[n % len(KINDS)]))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                n += 1
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, kind: str) -> None:
        outcome = Outcome(kind, time.monotonic())
        self.outcomes.append(outcome)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if kind == "websocket":
                    await self._websocket(session, outcome)
                else:
                    await self._http(session, kind, outcome)
        except (aiohttp.WSServerHandshakeError, aiohttp.ClientHttpProxyError) as exc:
            # refused before the upgrade, or the CONNECT refused: an answer, its reason in Proxy-Status
            outcome.status, outcome.reason = exc.status, proxy_status_reason(exc.headers)
        except aiohttp.ClientConnectorCertificateError as exc:
            outcome.error = type(exc).__name__  # the CONNECT was answered; the leaf in the tunnel was refused
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            outcome.error, outcome.detail = type(exc).__name__, str(exc)[:120]

    async def _http(self, session: aiohttp.ClientSession, kind: str, outcome: Outcome) -> None:
        c, headers, proxy, tls = self.clients, {}, None, None
        out = f"http://127.0.0.1:{c.ports['outbound']}"
        if kind in ("inbound", "human", "badkid"):  # human: a fresh token; badkid: signed by an unpublished key
            url, tls = f"https://127.0.0.1:{c.ports['inbound']}/tasks/x", c.inbound_tls
            if kind != "inbound":
                if kind == "human":
                    token, outcome.kid = c.issuer.token()
                else:
                    token = c.issuer.unknown_kid_token()
                headers["Authorization"] = f"Bearer {token}"
        elif kind == "connect":  # a new host name each time: each CONNECT mints a leaf (state_dir/intercept)
            url, proxy, tls = f"https://r{next(HOSTS)}.chaos.test/ok", out, c.intercept_tls
        else:
            upstream, path = {"denied": ("plain", "denied"), "sse": ("plain", "sse"),
                              "hours": ("plain", "hours")}.get(kind, (kind, "ok"))
            url = f"{out}/{upstream}/{path}"
            if kind == "plain":
                headers["X-Sidecar-Task"] = c.task
            if kind == "hours":
                outcome.trace = f"{TRACE_TAG:05x}{next(TRACES):027x}"
                headers["traceparent"] = f"00-{outcome.trace}-{1:016x}-01"
        if kind == "mcp":
            return await self._mcp(session, f"{out}/tools/mcp", outcome)
        async with session.get(url, ssl=tls if tls is not None else True, proxy=proxy, headers=headers) as r:
            outcome.status = r.status
            body = await r.read()
            if r.status >= 300 and r.content_type == "application/json":
                outcome.reason = json.loads(body).get("error")
            elif r.status == 200:
                outcome.ok = body.count(b"data: ") == SSE_EVENTS if kind == "sse" else True

    async def _mcp(self, session: aiohttp.ClientSession, url: str, outcome: Outcome) -> None:
        """An MCP initialize (JSON-RPC over streamable HTTP) to the SDK-built server: its serverInfo back."""
        headers = {"Accept": "application/json, text/event-stream"}
        async with session.post(url, json=INITIALIZE, headers=headers) as r:
            outcome.status = r.status
            body = await r.read()
            if r.status >= 300 and r.content_type == "application/json":
                error = json.loads(body).get("error")
                outcome.reason = error.get("data", {}).get("reason") if isinstance(error, dict) else error
            outcome.ok = r.status == 200 and b'"serverInfo"' in body

    async def _websocket(self, session: aiohttp.ClientSession, outcome: Outcome) -> None:
        url = f"ws://127.0.0.1:{self.clients.ports['outbound']}/plain/ws"
        async with session.ws_connect(url, autoclose=False) as ws:
            outcome.status = 101
            await ws.send_str("echo me")
            echoed = await ws.receive()
            closing = await ws.receive()
            outcome.ok = echoed.type == aiohttp.WSMsgType.TEXT and echoed.data == "echo me" and \
                closing.type == aiohttp.WSMsgType.CLOSE
            await ws.close()


def proxy_status_reason(headers: object) -> str | None:
    """The reason code a refusal names in its Proxy-Status header (``details="<reason>"``, RFC 9209)."""
    value = headers.get("Proxy-Status", "") if hasattr(headers, "get") else ""
    _, found, rest = str(value).partition('details="')
    return rest.split('"', 1)[0] if found else None


@dataclass
class Fault:
    name: str
    inject: Callable[[], Awaitable[None] | None]
    clear: Callable[[], Awaitable[None] | None]
    expect: frozenset[str] = frozenset()  # refusal reasons the fault may cause (any others count as unexpected)
    cut_ok: bool = False  # responses broken off mid-body are the fault's own outcome (reported, not lost)
    refused_by_client: frozenset[str] = frozenset()  # client-side errors that are the fault's own outcome
    min_seconds: float = 0.0  # the fault lasts at least this long, whatever --fault-seconds says
    felt: str = ""  # a counter the fault must raise while it lasts (else it was not exercised: broken)
    leaves_hours: bool = False  # the fault must put some 'hours' calls outside the window (else: not exercised)
    check: Callable[[], Awaitable[str | None]] | None = None  # after recovery: what the fault left wrong, or None


@dataclass
class Row:
    fault: str
    sent: int = 0
    exchanges: int = 0
    lost: int = 0
    wrong: int = 0
    recovery: float | None = None
    events: int = 0
    felt: tuple[str, float] | None = None  # the fault's counter and how much it rose
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    losses: collections.Counter[str] = field(default_factory=collections.Counter)  # lost, by kind and error
    lost_detail: list[str] = field(default_factory=list)  # each loss (the first 8): when, what, the client's message
    hours: tuple[int, int, int] = (0, 0, 0)  # 'hours' calls: inside the window, outside it, without an event
    leaves_hours: bool = False
    checked: str | None = None  # what the fault's own check found wrong after recovery

    @property
    def held(self) -> bool:
        return (self.lost == 0 and self.wrong == 0 and self.recovery is not None and self.events == self.exchanges
                and not self.unexpected and (self.felt is None or self.felt[1] > 0) and self.hours[2] == 0
                and (not self.leaves_hours or self.hours[1] > 0) and self.checked is None)


class LogPump:
    """Copies the sidecar's stdout (a pipe) into its log file, in a thread; ``pause()`` stops reading, as a
    log consumer that stalls, until ``resume()``."""

    def __init__(self, source: IO[bytes], log: Path) -> None:
        self._source, self._log = source, log
        self._reading = threading.Event()
        self._reading.set()
        self._thread = threading.Thread(target=self._run, name="chaos-log-pump", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def _run(self) -> None:
        with self._log.open("ab") as out:
            while True:
                self._reading.wait()
                chunk = os.read(self._source.fileno(), 65536)
                if not chunk:
                    return
                out.write(chunk)
                out.flush()

    def join(self, timeout: float) -> None:
        self.resume()
        self._thread.join(timeout)


class World:
    """Everything the faults act on, started once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tokens, self.agent, self.issuer = TokenEndpoint(tmp / "token-ca.pem"), Agent(), Issuer(tmp / "idp-ca.pem")
        self.upstream = Upstream(self.tokens)
        self.ports = {name: free_port() for name in ("inbound", "outbound", "health", "metrics", "admin")}
        self.redis_port = free_port()
        # the sidecar reaches the token endpoint (HTTPS) and Redis through relays a fault can cut off
        self.token_front: Front | None = None
        self.redis_front: Front | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.pump: LogPump | None = None
        self.log = tmp / "sidecar.out"
        self.policy = tmp / "policy.yaml"
        self.svid_dir = tmp / "svid"
        self.state = tmp / "sidecar-state"  # the sidecar's state_dir: a tmpfs in its own mount namespace
        self.intercept = {"cert": tmp / "intercept" / "ca.crt", "key": tmp / "intercept" / "ca.key"}
        self.clock_file = tmp / "faketime"
        self.token_file = tmp / "admin-token"
        self.namespaced = os.geteuid() == 0 and shutil.which("unshare") is not None and \
            shutil.which("nsenter") is not None
        self.faked_clock = FAKETIME.exists()
        self.task = ""
        self.hours_window = (datetime.min.replace(tzinfo=timezone.utc),) * 2  # write_policy sets both
        self.policy_written = 0.0
        self.mcp: subprocess.Popen[bytes] | None = None
        self.mcp_port = 0

    async def start(self) -> None:
        for peer in (self.upstream, self.tokens, self.agent, self.issuer):
            await peer.start()
        self.token_front = await Front(self.tokens.port).start()
        self.redis_front = await Front(self.redis_port).start()
        self.start_redis()
        from sidecar.identity.ca import InterceptionCA, ca_issue

        state = self.tmp / "state"
        ca_issue(state, OURS, self.svid_dir)
        self.caller = ca_issue(state, CALLER, self.tmp / "caller")
        self.svid = {name: self.svid_dir / Path(path).name for name, path in
                     ca_issue(state, OURS, self.svid_dir).items()}
        self.good_svid = {name: path.read_bytes() for name, path in self.svid.items()}
        made = self.tmp / "intercept-made"
        InterceptionCA.load_or_create(None, None, made)
        self.intercept["cert"].parent.mkdir()
        for name, path in self.intercept.items():
            shutil.copy(made / "intercept" / f"ca.{'crt' if name == 'cert' else 'key'}", path)
        self.good_intercept = {name: path.read_bytes() for name, path in self.intercept.items()}
        rotated = self.tmp / "intercept-rotated"  # the CA a rotation puts in force: agents trust it beforehand
        InterceptionCA.load_or_create(None, None, rotated)
        self.rotated_intercept = {name: (rotated / "intercept" / f"ca.{'crt' if name == 'cert' else 'key'}").read_bytes()
                                  for name in self.intercept}
        self.mcp = subprocess.Popen([sys.executable, str(MCP_SERVER)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        assert self.mcp.stdout is not None
        line = self.mcp.stdout.readline()  # it prints its port once listening, or dies
        if not line.startswith(b"PORT "):
            raise SystemExit(f"chaos: the MCP SDK server did not start: {line!r}")
        self.mcp_port = int(line.split()[1])
        self.state.mkdir()
        self.clock_file.write_text("+0\n")
        self.token_file.write_text("chaos-admin-token-0417\n")
        self.token_file.chmod(0o600)
        self.write_policy()
        (self.tmp / "sidecar.yaml").write_text(yaml.safe_dump(self.config()))
        self.sidecar = self.spawn([sys.executable, "-m", "sidecar", "run", "-c", str(self.tmp / "sidecar.yaml")])
        await self.wait_ready()
        self.task = await self.open_task()

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """The sidecar process: in its own mount namespace with state_dir on a tmpfs, under libfaketime, its
        output (events included) through the pump into ``self.log``."""
        env = dict(os.environ)
        if self.faked_clock:
            env |= {"LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                    "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        if self.namespaced:
            mount = f'mount -t tmpfs -o size={STATE_BYTES},mode=0700 tmpfs "{self.state}" && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", mount, "sh", *argv]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert process.stdout is not None
        self.pump = LogPump(process.stdout, self.log)
        return process

    def in_namespace(self, command: str) -> None:
        """A shell command run in the sidecar's mount namespace (where its state_dir is mounted)."""
        assert self.sidecar is not None
        subprocess.run(["nsenter", "-t", str(self.sidecar.pid), "-m", "--", "sh", "-c", command], check=True)

    def rotate_svid(self) -> None:
        """A new SVID for the same ID, written over the watched files (as cert-manager renews one)."""
        from sidecar.identity.ca import ca_issue

        ca_issue(self.tmp / "state", OURS, self.svid_dir)

    def rotate_intercept_ca(self) -> None:
        """The next interception CA written over the configured files as an operator rotates it: the agents
        already trust it (a bundle of both), the key is replaced first, then the certificate, one rename each."""
        for name in ("key", "cert"):
            path = self.intercept[name]
            fresh = path.with_name(f".{path.name}.new")
            fresh.write_bytes(self.rotated_intercept[name])
            os.replace(fresh, path)

    def config(self) -> dict:
        up = self.upstream.url
        config = {
            "agent": {"name": "chaos-agent"}, "state_dir": str(self.state), "policy": {"files": [str(self.policy)]},
            "identity": {"svid": {"cert": str(self.svid["cert"]), "key": str(self.svid["key"]),
                                  "bundle": str(self.svid["bundle"])}},
            "inbound": {"listen": f"127.0.0.1:{self.ports['inbound']}", "forward_to": self.agent.url,
                        "trust_domains": ["sidecar.local"],
                        "jwt": {"issuers": [{"issuer": self.issuer.name, "jwks_uri": self.issuer.jwks_uri,
                                             "ca": str(self.issuer.ca_file), "audiences": [self.issuer.audience],
                                             "algorithms": ["ES256"]}]}},
            "outbound": {"listen": f"127.0.0.1:{self.ports['outbound']}",
                         # connect bounds a WebSocket's upgrade answer too, which the harness's own upstream (one
                         # loop with the traffic) took 2.2 s to give at load average 9: 4 s, as first_byte
                         "timeouts": {"connect": "4s", "first_byte": "4s", "idle": f"{IDLE:g}s"},
                         "intercept": {"ca_cert": str(self.intercept["cert"]), "ca_key": str(self.intercept["key"])},
                         "upstreams": {"plain": {"url": up, "credential": "key"},
                                       "oauth": {"url": f"http://localhost:{self.upstream.port}",
                                                 "credential": "tokens"},
                                       "intercepted": {"url": up, "hosts": ["*.chaos.test"]},
                                       "tools": {"url": f"http://127.0.0.1:{self.mcp_port}", "protocol": "mcp"}}},
            "credentials": {
                "key": {"type": "static", "header": "X-API-Key", "value": {"value": "chaos-static-key"}},
                "tokens": {"type": "oauth2_client_credentials", "ca": str(self.tokens.ca_file),
                           "token_url": f"https://127.0.0.1:{self.token_front.port}/token",
                           "client_id": "chaos", "auth": "client_secret_post",
                           "client_secret": {"value": "chaos-secret"}, "timeout": "2s"}},
            "logging": {"buffer_bytes": LOG_BUFFER, "block_timeout": "1s"},
            "admin": {"listen": f"127.0.0.1:{self.ports['admin']}", "token_file": str(self.token_file)},
            **{name: {"listen": f"127.0.0.1:{self.ports[name]}"} for name in ("health", "metrics")}}
        if self.redis is not None:
            config["revocation"] = {"redis_url": f"redis://127.0.0.1:{self.redis_front.port}/0", "require_sync": False}
        return config

    def write_policy(self, comment: str = "") -> None:
        """The policy, its 'hours' window HOURS_WINDOW minutes either side of now (UTC, whole minutes)."""
        now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        self.hours_window = (now - timedelta(minutes=HOURS_WINDOW), now + timedelta(minutes=HOURS_WINDOW))
        self.policy_written = time.monotonic()
        start, end = (t.strftime("%H:%M") for t in self.hours_window)
        self.policy.write_text(f"# {comment}\n" + yaml.safe_dump({"version": 1, "default": "deny", "rules": [
            {"id": "plain-ok", "direction": "outbound", "upstream": "plain", "paths": ["/ok", "/sse", "/ws"],
             "effect": "allow"},
            {"id": "plain-hours", "direction": "outbound", "upstream": "plain", "paths": ["/hours"], "effect": "allow",
             "when": {"hours": {"from": start, "to": end, "tz": "UTC"}}},
            {"id": "oauth-ok", "direction": "outbound", "upstream": "oauth", "paths": ["/ok"], "effect": "allow"},
            {"id": "intercepted-ok", "direction": "outbound", "upstream": "intercepted", "paths": ["/ok"],
             "effect": "allow"},
            {"id": "tools", "direction": "outbound", "upstream": "tools", "mcp": {"tools": ["search"]},
             "effect": "allow"},
            {"id": "no-denied", "direction": "outbound", "upstream": "plain", "paths": ["/denied"], "effect": "deny"},
            {"id": "caller", "direction": "inbound", "callers": [CALLER], "effect": "allow"}]}))

    def start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            return
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            try:
                await wait_ready(session, self.ports["health"], tries=300)
            except AssertionError:
                raise SystemExit(f"chaos: sidecar run did not become ready; its output is in {self.log}") from None

    async def open_task(self) -> str:
        """A task for the plain requests, its TTL on the monotonic clock: a stepped wall clock must not end it."""
        headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{self.ports['admin']}/tasks", headers=headers,
                                    json={"principal": "chaos@example.com", "ttl": "30m"}) as r:
                body = await r.json()
                if r.status != 201:
                    raise SystemExit(f"chaos: could not open a task: {r.status} {body}")
                return str(body["id"])

    async def revoke(self, subject: str) -> str:
        """A revocation of a subject no traffic carries (its enforcement changes no decision): its rid, once the
        admin API answered (in force locally before it returns)."""
        headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{self.ports['admin']}/revocations", headers=headers,
                                    json={"kind": "subject", "id": subject, "ttl": "1h"}) as r:
                body = await r.json()
                if r.status != 201:
                    raise SystemExit(f"chaos: could not revoke: {r.status} {body}")
                return str(body["rid"])

    def stored(self, rid: str) -> bool:
        """Is the revocation stored in Redis (where the rest of a fleet reads it)?"""
        found = subprocess.run(["redis-cli", "-p", str(self.redis_port), "EXISTS", f"sidecar:revocation:{rid}"],
                               capture_output=True, text=True, timeout=10)
        return found.stdout.strip() == "1"

    async def metric(self, name: str) -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics") as r:
                text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def traced_events(self) -> dict[str, tuple[datetime, str]]:
        """The events of 'hours' calls by trace id: the sidecar's own time of the exchange, and its reason."""
        found = {}
        for line in self.log.read_bytes().splitlines():
            if b'"trace_id":"%05x' % TRACE_TAG in line and line.startswith(b"{"):
                event = json.loads(line)
                ts = datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                found[event["trace_id"]] = (ts, event["reason"])
        return found

    def events(self) -> int:
        count = 0
        for line in self.log.read_bytes().splitlines():
            if line.startswith(b"{") and b'"event":"trust_decision"' in line.replace(b" ", b""):
                count += 1
        return count

    def clients(self) -> Clients:
        inbound = ssl.create_default_context(cafile=str(self.caller["bundle"]))
        inbound.check_hostname = False
        inbound.load_cert_chain(str(self.caller["cert"]), str(self.caller["key"]))
        intercept = ssl.create_default_context(cadata=(self.good_intercept["cert"]
                                                       + self.rotated_intercept["cert"]).decode())
        return Clients(self.ports, inbound, intercept, self.task, self.issuer)

    async def stop(self) -> None:
        for process in (self.sidecar, self.redis, self.mcp):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.pump is not None:
            self.pump.join(5)
        for front in (self.token_front, self.redis_front):
            if front is not None:
                await front.stop()
        for peer in (self.upstream, self.tokens, self.agent, self.issuer):
            await peer.stop()


CA_RELOADED = 'sidecar_intercept_ca_reloads_total{outcome="ok"}'
CA_REFUSED = 'sidecar_intercept_ca_reloads_total{outcome="error"}'


def faults(world: World) -> list[Fault]:
    def mode(peer: object, value: str) -> Callable[[], None]:
        return lambda: setattr(peer, "mode", value)

    def jwks(value: str) -> Callable[[], None]:
        def switch() -> None:
            world.issuer.mode, world.issuer.new_strangers = value, value != "normal"
        return switch

    def svid_write(content: dict[str, bytes | None]) -> Callable[[], None]:
        def write() -> None:
            for name, data in content.items():
                path = world.svid[name]
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(data)
        return write

    async def storm() -> None:
        for n in range(100):
            world.write_policy(f"reload {n}")
            await asyncio.sleep(0.1)

    def half_policy() -> None:
        text = world.policy.read_text()
        world.policy.write_text(text[: len(text) // 2])

    async def redis_down() -> None:
        assert world.redis is not None
        world.redis.kill()
        world.redis.wait()

    async def redis_up() -> None:
        world.start_redis()

    flapping: list[asyncio.Task[None]] = []
    revoked: list[str] = []

    async def partition() -> None:
        assert world.redis_front is not None
        world.redis_front.mode = "partitioned"
        await asyncio.sleep(2.0)  # the bus's connection is held, not closed: it must find out for itself
        revoked.append(await world.revoke(f"partitioned-{len(revoked)}@example.com"))

    async def partition_healed() -> str | None:
        rid = revoked[-1]
        for _ in range(60):  # up to 30 s for the outbox to reach Redis
            if world.stored(rid):
                return None
            await asyncio.sleep(0.5)
        return f"{rid}, revoked during the partition, is not in Redis 30 s after it healed"

    async def flap() -> None:  # down 1.5 s, up 1.5 s, for as long as the fault lasts
        while True:
            await redis_down()
            await asyncio.sleep(1.5)
            await redis_up()
            await asyncio.sleep(1.5)

    def flap_start() -> None:
        flapping.append(asyncio.ensure_future(flap()))

    async def flap_stop() -> None:
        task = flapping.pop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if world.redis is None or world.redis.poll() is not None:
            await redis_up()

    def files(paths: dict[str, Path], content: dict[str, bytes | None]) -> Callable[[], None]:
        def write() -> None:
            for name, data in content.items():
                if data is None:
                    paths[name].unlink(missing_ok=True)
                else:
                    paths[name].write_bytes(data)
        return write

    def clock(step: str, fresh_window: bool = False) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            if fresh_window:  # the window around now, and a moment for the reload, before the step
                world.write_policy(f"the hours window before a step of {step}")
                await asyncio.sleep(1.5)
            world.clock_file.write_text(step + "\n")
        return write

    def pump(pause: bool) -> Callable[[], None]:
        assert world.pump is not None
        return world.pump.pause if pause else world.pump.resume

    fill = f'cat /dev/zero > "{world.state}/fill" 2>/dev/null; true'
    up, tokens, ca = world.upstream, world.tokens, world.good_intercept
    refused_upstream = frozenset({"upstream_unreachable", "upstream_timeout"})
    table = [
        Fault("steady", lambda: None, lambda: None),
        Fault("upstream-reset", mode(up, "reset"), mode(up, "normal"), refused_upstream),
        Fault("upstream-slow", mode(up, "slow"), mode(up, "normal"), frozenset({"upstream_timeout"})),
        Fault("upstream-cut", mode(up, "cut"), mode(up, "normal"), refused_upstream, cut_ok=True),
        # requests read and never answered nor closed: first_byte (4 s) refuses each, and a connection left so
        # is never handed to another request (the pool would give every later one the same silence); cleared,
        # the upstream aborts those it still holds (upstream_unreachable for requests within 4 s of the end)
        Fault("upstream-half-open", mode(up, "half-open"), mode(up, "normal"), refused_upstream),
        # an answer whose head is past the limit on a response field: refused, nothing of it relayed (the
        # WebSocket leg, aiohttp's client, names it upstream_unreachable)
        Fault("upstream-oversize", mode(up, "oversize"), mode(up, "normal"),
              frozenset({"upstream_protocol_error", "upstream_unreachable"})),
        Fault("token-down", mode(tokens, "down"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-slow", mode(tokens, "slow"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-garbage", mode(tokens, "garbage"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        Fault("token-error", mode(tokens, "error"), mode(tokens, "normal"), frozenset({"credential_unavailable"})),
        # the token endpoint (HTTPS) cut off: a new connection's TLS handshake hears nothing after its ClientHello,
        # one already open hears nothing more; the credential's 2 s timeout must bound both
        Fault("token-tls-hang", mode(world.token_front, "partitioned"), mode(world.token_front, "normal"),
              frozenset({"credential_unavailable"})),
        # the JWKS endpoint gone: the keys fetched before keep verifying; an unknown kid is refused (as always).
        # Its tokens name a new kid each call meanwhile: the one unknown kid of the steady traffic is, after the
        # first good refresh, known absent and fetches nothing (5 min), so the fault would go unmet. It lasts
        # past the sidecar's 30 s between unknown-kid refreshes, so that one is tried while it is down
        Fault("jwks-down", jwks("down"), jwks("normal"), min_seconds=32.0, felt="sidecar_jwks_fetch_failures_total"),
        # one that does not answer (45 s: 30 s between refreshes, then the 10 s fetch timeout): an unknown kid
        # waits out the timeout and is refused; known kids never wait for it
        Fault("jwks-slow", jwks("slow"), jwks("normal"), min_seconds=45.0,
              felt="sidecar_jwks_fetch_failures_total"),
        # a new key published beside the old and signing at once: a new kid makes the sidecar refresh (at most
        # once per 30 s, which the unknown-kid traffic also spends), tokens it refuses before then are the
        # fault's; the old key verifies throughout; cleared by retiring the old key
        Fault("jwks-rotated", world.issuer.rotate, world.issuer.retire, frozenset({"token_invalid"})),
        Fault("policy-half-written", half_policy, lambda: world.write_policy("restored")),
        Fault("policy-reload-storm", storm, lambda: world.write_policy("after the storm")),
        Fault("svid-garbage", svid_write({"cert": b"garbage", "key": b"garbage"}), svid_write(world.good_svid)),
        Fault("svid-deleted", svid_write({"cert": None, "key": None}), svid_write(world.good_svid)),
        # a new SVID for the same ID written over the files (a renewal): taken without a refusal; cleared by
        # writing the first one back (still valid: a second renewal)
        Fault("svid-rotated", world.rotate_svid, svid_write(world.good_svid)),
        Fault("svid-truncated", svid_write({n: v[: len(v) // 2] for n, v in world.good_svid.items() if n != "bundle"}),
              svid_write(world.good_svid)),
        # the interception CA's files are watched: a rotation to a CA the agents trust signs the next leaves (and
        # its clearing rotates back); files deleted, truncated or garbage keep the last good CA, a failed reload
        Fault("intercept-ca-rotated", lambda: world.rotate_intercept_ca(), files(world.intercept, ca),
              felt=CA_RELOADED),
        Fault("intercept-ca-deleted", files(world.intercept, {"cert": None, "key": None}), files(world.intercept, ca),
              felt=CA_REFUSED),
        Fault("intercept-ca-truncated", files(world.intercept, {n: v[: len(v) // 2] for n, v in ca.items()}),
              files(world.intercept, ca), felt=CA_REFUSED),
        Fault("intercept-ca-garbage", files(world.intercept, {"cert": b"garbage", "key": b"garbage"}),
              files(world.intercept, ca), felt=CA_REFUSED),
        Fault("stdout-blocked", pump(True), pump(False), frozenset({"log_unavailable"})),
    ]
    if world.faked_clock:  # the wall clock stepped for the sidecar alone; TTLs and expiries are monotonic.
        # Certificates are judged by the wall clock, whichever is wrong: an hour ahead the caller's 1-hour SVID
        # has expired for the sidecar (peer_unverified), and the leaves it mints start an hour in the agent's
        # future (the agent's TLS refuses them): refusals of the fault, both closed.
        # A human token is judged by the stepped clock too: an hour ahead it has expired (exp is 5 min), an hour
        # back it was issued in the future (iat): token_invalid on a connection that kept its verified caller.
        # The 'hours' window (40 min either side of the policy's writing, which the step's inject renews) is
        # left by both steps: every 'hours' call the sidecar's clock put outside it must be refused at once.
        stepped = frozenset({"peer_unverified", "token_invalid"})
        table += [Fault("clock-forward-1h", clock("+1h", fresh_window=True), clock("+0"), stepped,
                        refused_by_client=frozenset({"ClientConnectorCertificateError"}), leaves_hours=True),
                  Fault("clock-back-1h", clock("-1h", fresh_window=True), clock("+0"), stepped,
                        refused_by_client=frozenset({"ClientConnectorCertificateError"}), leaves_hours=True)]
    if world.namespaced:  # state_dir is the sidecar's own tmpfs
        table += [Fault("state-dir-full", lambda: world.in_namespace(fill),
                        lambda: world.in_namespace(f'rm -f "{world.state}/fill"')),
                  Fault("state-dir-read-only", lambda: world.in_namespace(f'mount -o remount,ro "{world.state}"'),
                        lambda: world.in_namespace(f'mount -o remount,rw "{world.state}"'))]
    if world.redis is not None:
        table += [Fault("redis-down", redis_down, redis_up), Fault("redis-flapping", flap_start, flap_stop),
                  # the network to Redis cut off (nothing closed, nothing answered) while a revocation is issued:
                  # in force locally at once (the admin API answers after), and stored in Redis once the
                  # partition heals (the outbox), where the rest of the fleet reads it
                  Fault("redis-partition", partition, mode(world.redis_front, "normal"), check=partition_healed)]
    named = {f.name: f for f in table}
    several = ["upstream-slow", "token-down", "svid-garbage", "redis-down", "jwks-down"]
    table.append(together("together", [named[n] for n in several if n in named]))
    return table


def together(name: str, several: list[Fault]) -> Fault:
    """Several faults at once: injected in order, cleared in reverse."""
    async def inject() -> None:
        for fault in several:
            await maybe(fault.inject())

    async def clear() -> None:
        for fault in reversed(several):
            await maybe(fault.clear())

    return Fault(f"{name}({'+'.join(f.name for f in several)})", inject, clear,
                 frozenset().union(*(f.expect for f in several)), any(f.cut_ok for f in several),
                 min_seconds=max(f.min_seconds for f in several),
                 felt=next((f.felt for f in several if f.felt), ""), leaves_hours=any(f.leaves_hours for f in several))


async def maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


async def run_fault(world: World, fault: Fault, fault_seconds: float, rate: float = RATE) -> Row:
    if time.monotonic() - world.policy_written > HOURS_REFRESH:  # the 'hours' window follows a long run
        world.write_policy("the hours window moved on")
        await asyncio.sleep(2.0)
    traffic = Traffic(world.clients(), rate)
    events_before, dropped_before = world.events(), await world.metric(DROPPED_EVENTS)
    felt_before = await world.metric(fault.felt) if fault.felt else 0.0
    traffic.start()
    await asyncio.sleep(2.0)
    began = time.monotonic()
    await maybe(fault.inject())
    await asyncio.sleep(max(0.0, max(fault_seconds, fault.min_seconds) - (time.monotonic() - began)))
    felt = (fault.felt, await world.metric(fault.felt) - felt_before) if fault.felt else None
    await maybe(fault.clear())
    cleared = time.monotonic()
    recovery = await recovered(traffic, cleared)
    checked = await fault.check() if fault.check is not None else None
    await asyncio.sleep(2.0)
    await traffic.stop()
    await asyncio.sleep(1.5)  # the last events reach the log
    dropped = await world.metric(DROPPED_EVENTS) - dropped_before
    unjudged = hours_due(traffic, world.traced_events(), world.hours_window)
    row = judge(fault, traffic, began, cleared, recovery, world.events() - events_before + int(dropped))
    inside = sum(1 for o in traffic.outcomes if o.trace and o.due is None and o.status == 200)
    outside = sum(1 for o in traffic.outcomes if o.trace and o.due is not None)
    row.hours, row.leaves_hours, row.checked = (inside, outside, unjudged), fault.leaves_hours, checked
    row.felt = felt
    return row


async def recovered(traffic: Traffic, since: float, limit: float = 30.0) -> float | None:
    """Seconds from ``since`` until every kind has answered as policy says, in requests sent after it."""
    while time.monotonic() - since < limit:
        await asyncio.sleep(0.2)
        good = {o.kind for o in traffic.outcomes if o.at >= since and _as_policy_says(o)}
        if good >= set(KINDS):
            return max(min(o.at for o in traffic.outcomes if o.at >= since and o.kind == kind and _as_policy_says(o))
                       for kind in KINDS) - since
    return None


def hours_due(traffic: Traffic, events: dict[str, tuple[datetime, str]], window: tuple[datetime, datetime]) -> int:
    """Marks each 'hours' call the sidecar's clock put outside the window as due OUTSIDE_HOURS; the count of
    policy answers (200, no_matching_rule) that have no event to judge them by (each breaks the row)."""
    unjudged = 0
    for o in traffic.outcomes:
        if o.trace is None:
            continue
        found = events.get(o.trace)
        if found is None:
            unjudged += o.status == 200 or o.reason == OUTSIDE_HOURS[1]
        elif not window[0] <= found[0] < window[1]:
            o.due = OUTSIDE_HOURS
    return unjudged


def refused_as(o: Outcome) -> tuple[int, str] | None:
    """The refusal policy owes this call (its status and reason), or None: it is to be served."""
    return REFUSED.get(o.kind) or o.due


def _as_policy_says(o: Outcome) -> bool:
    due = refused_as(o)
    if due is not None:
        return (o.status, o.reason) == due
    return o.status in (200, 101) and o.ok and not o.error


def judge(fault: Fault, traffic: Traffic, began: float, cleared: float, recovery: float | None,
          events: int) -> Row:
    row = Row(fault.name, sent=len(traffic.outcomes), exchanges=traffic.exchanges, recovery=recovery, events=events)
    for o in traffic.outcomes:
        if (o.error or o.status in (200, 101) and not o.ok) and not fault.cut_ok and o.status is not None \
                and o.error not in fault.refused_by_client and len(row.lost_detail) < 8:
            row.lost_detail.append(f"{o.at - began:+.1f}s {o.kind} {o.status} {o.error or 'not whole'}: "
                                   f"{o.detail or '-'}")
        if o.error in fault.refused_by_client:
            row.refusals[f"client: {o.error}"] += 1
            continue
        if o.status is None:
            row.lost += 1
            row.losses[f"{o.kind} {o.error or 'no answer'}"] += 1
            if len(row.lost_detail) < 8:
                row.lost_detail.append(f"{o.at - began:+.1f}s {o.kind} {o.error}: {o.detail or '-'}")
            continue
        if (o.error or o.status in (200, 101) and not o.ok) and not fault.cut_ok:
            row.lost += 1  # an answer broken off (or not what the upstream sent) where the fault does not explain it
            row.losses[f"{o.kind} {o.status} {o.error or 'not whole'}"] += 1
        due = refused_as(o)
        if due is not None and o.status < 300 or due is None and o.reason in POLICY_DENIALS:
            row.wrong += 1
        if due is not None and o.status >= 300 and (o.status, o.reason) != due:
            if o.reason in fault.expect:  # refused as it must be, for the fault's reason before its own
                row.refusals[f"{o.kind}: {o.reason}"] += 1
            else:
                row.unexpected[f"{o.kind}: {o.reason or o.status}"] += 1  # refused, but not for its own reason
        if o.status >= 300 and due is None:
            row.refusals[(o.reason or str(o.status)) + (f" (kid {o.kid})" if o.kid else "")] += 1
            if o.reason not in fault.expect:
                row.unexpected[o.reason or str(o.status)] += 1
    return row


def show(rows: list[Row]) -> None:
    width = max([22, *(len(r.fault) + 2 for r in rows)])
    print(f"{'fault':<{width}}{'sent':>6}{'lost':>6}{'wrong':>7}{'recovery':>10}{'events/exchanges':>17}  refusals (unexpected)")
    for r in rows:
        recovery = f"{r.recovery:.1f}s" if r.recovery is not None else "never"
        refusals = ", ".join(f"{k} {v}" for k, v in r.refusals.most_common()) or "-"
        unexpected = ", ".join(f"{k} {v}" for k, v in r.unexpected.most_common())
        mark = "" if r.held else "   <-- BROKEN"
        print(f"{r.fault:<{width}}{r.sent:>6}{r.lost:>6}{r.wrong:>7}{recovery:>10}{r.events:>5}/{r.exchanges:<5} {refusals}"
              f"{f' ({unexpected})' if unexpected else ''}{mark}")
        if r.felt is not None:
            print(f"{'':<{width}}felt: {r.felt[0]} +{r.felt[1]:g}{'' if r.felt[1] > 0 else ' (the fault was not exercised)'}")
        if r.checked is not None:
            print(f"{'':<{width}}check: {r.checked}")
        if r.losses:
            print(f"{'':<{width}}lost: {', '.join(f'{k} {v}' for k, v in r.losses.most_common())}")
            for line in r.lost_detail:
                print(f"{'':<{width}}  {line}")
        if r.leaves_hours or r.hours[1] or r.hours[2]:
            print(f"{'':<{width}}hours: {r.hours[0]} inside the window served, {r.hours[1]} outside it (by the "
                  f"sidecar's clock) judged, {r.hours[2]} answered with no event to judge by"
                  f"{' (the step never left the window)' if r.leaves_hours and not r.hours[1] else ''}")


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        await world.start()
        try:
            left_out = [why for why, there in (("clock faults: no libfaketime (apt-get install faketime)",
                                                world.faked_clock),
                                               ("state_dir faults: unshare/nsenter as root needed", world.namespaced),
                                               ("redis faults: no redis-server", world.redis is not None)) if not there]
            for why in left_out:
                print(f"chaos: left out: {why}")
            chosen = [f for f in faults(world) if not args.only or f.name.split("(")[0] in args.only.split(",")]
            rows = []
            for fault in chosen:
                rows.append(await run_fault(world, fault, args.fault_seconds, args.rate))
                show(rows[-1:])  # as it comes: a long run shows its figures before the table
                sys.stdout.flush()
            alive = world.sidecar is not None and world.sidecar.poll() is None
        finally:
            await world.stop()
            if args.keep_log:
                shutil.copy(world.log, args.keep_log)
    show(rows)
    broken = [r.fault for r in rows if not r.held] + ([] if alive else ["the sidecar process exited"])
    print("chaos: every promise held" if not broken else f"chaos: BROKEN: {', '.join(broken)}")
    return 1 if broken else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated fault names")
    parser.add_argument("--fault-seconds", type=float, default=12.0,
                        help="how long each fault lasts (token faults need more than a token's 8 s lifetime)")
    parser.add_argument("--keep-log", default="", help="copy the sidecar's output here")
    parser.add_argument("--rate", type=float, default=RATE,
                        help="requests a second, all kinds together (lower it on a loaded machine)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
