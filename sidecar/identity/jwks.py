"""JWKS key sets: parsed once into key objects, refreshed off the request path, kept on failure.

A :class:`KeySet` is the parsed, immutable form of one JWKS document: every usable key is a
:class:`VerificationKey` holding a ``cryptography`` public key object and the algorithms it may
verify (the issuer's allow-list intersected with what the key's type and curve can do, and with
the JWK's own ``alg`` when it names one). Keys with ``use: enc``, ``key_ops`` without
``verify``, private material, an unsupported ``kty``/``crv``, RSA under 2048 bits, or no
algorithm left are ignored (and logged); symmetric keys never get in.

A :class:`KeySource` owns one issuer's key set: it reads ``jwks_file`` or fetches ``jwks_uri``
over HTTPS (with the optional ``ca``; certificate verification is never turned off, redirects
are not followed), single-flight. A failed refresh is logged, counted in
``sidecar_jwks_fetch_failures_total{issuer}`` and leaves the last good key set in force.
An unknown ``kid`` may trigger a refresh, at most once per ``min_refresh_interval``. A kid a good
refresh has just found absent is remembered for :data:`ABSENT_FOR`: the same stale or made-up kid does
not spend that slot again, so a caller repeating one cannot hold back the refresh a real rotation needs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import aiohttp
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from sidecar.config_model import JwtIssuerConfig
from sidecar.http.tls import client_ssl_context

if TYPE_CHECKING:
    from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.identity.jwks")
ABSENT_FOR = 300.0  # seconds a kid a refresh found absent triggers no refresh (the periodic one still runs)
ABSENT_MAX = 1024

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 10.0


class JwksError(Exception):
    """A JWKS document that could not be read or parsed; the message names no secret."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key and the algorithms it may verify."""

    kid: str | None
    key: Any = field(repr=False)  # a cryptography public key object
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one JWKS document, indexed for one lookup per request."""

    by_kid: Mapping[str, tuple[VerificationKey, ...]]
    only_key_for_alg: Mapping[str, VerificationKey]  # algs for which exactly one key exists
    size: int

    @classmethod
    def of(cls, keys: list[VerificationKey]) -> KeySet:
        by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        per_alg: dict[str, list[VerificationKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
            for alg in key.algorithms:
                per_alg.setdefault(alg, []).append(key)
        only = {alg: found[0] for alg, found in per_alg.items() if len(found) == 1}
        return cls(by_kid, only, len(keys))


def parse_jwks(data: bytes, allowed: frozenset[str], issuer: str = "") -> KeySet:
    """Parse a JWKS document into key objects; raise :class:`JwksError` when no key is usable."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise JwksError("jwks is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("jwks must be a JSON object with a 'keys' list")
    keys = [k for k in (_key(jwk, allowed, issuer) for jwk in doc["keys"]) if k is not None]
    if not keys:
        raise JwksError("jwks has no usable signature verification key for the allowed algorithms")
    return KeySet.of(keys)


def _key(jwk: Any, allowed: frozenset[str], issuer: str) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        return None
    kid = jwk.get("kid")
    why = _unusable(jwk)
    algorithms = _algorithms(jwk) & allowed if why is None else frozenset()
    if why is None and not algorithms:
        why = "no allowed algorithm for this key"
    if why is None:
        key, why = _key_object(jwk)
        if why is None:
            return VerificationKey(kid if isinstance(kid, str) else None, key, algorithms)
    log.info("jwks_key_ignored", issuer=issuer, kid=kid if isinstance(kid, str) else None, reason=why)
    return None


def _unusable(jwk: dict[str, Any]) -> str | None:
    if jwk.get("use", "sig") != "sig":
        return "use is not sig"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not include verify"
    if any(part in jwk for part in ("d", "p", "q", "k")):
        return "carries private or symmetric key material"
    if "kid" in jwk and not isinstance(jwk["kid"], str):
        return "kid is not a string"
    return None


def _algorithms(jwk: dict[str, Any]) -> frozenset[str]:
    """What the key's type and curve can verify, narrowed to the JWK's ``alg`` if it names one."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        possible = _RSA_ALGORITHMS
    elif kty == "EC" and crv in _EC_ALGORITHM:
        possible = frozenset({_EC_ALGORITHM[crv]})
    elif kty == "OKP" and crv in _OKP_CURVES:
        possible = frozenset({"EdDSA"})
    else:
        return frozenset()
    alg = jwk.get("alg")
    return possible if alg is None else possible & {alg}


def _key_object(jwk: dict[str, Any]) -> tuple[Any, str | None]:
    from jwt import PyJWK  # PyJWT only once a key set is read (start-up without jwt_issuers skips it)
    from jwt.exceptions import PyJWTError

    representative = {"RSA": "RS256", "EC": _EC_ALGORITHM.get(jwk.get("crv", "")), "OKP": "EdDSA"}
    try:
        key = PyJWK(dict(jwk), algorithm=representative[jwk["kty"]]).key
    except (PyJWTError, KeyError, TypeError, ValueError):
        return None, "not a valid public key"
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return None, f"rsa key shorter than {MIN_RSA_BITS} bits"
    return key, None


class KeySource:
    """One issuer's key set: loaded, refreshed single-flight, last good one kept on failure."""

    def __init__(self, config: JwtIssuerConfig, allowed: frozenset[str], *,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic,
                 min_refresh_interval: float = 30.0) -> None:
        self.config = config
        self.allowed = allowed
        self.keys: KeySet | None = None
        self._clock = clock
        self._min_interval = min_refresh_interval
        self._failures = metrics.jwks_fetch_failures.labels(config.issuer) if metrics else None
        self._ssl = client_ssl_context(str(config.ca) if config.ca else None) if config.jwks_uri else None
        self._session: aiohttp.ClientSession | None = None
        self._last_raw: bytes | None = None
        self._last_token_refresh: float | None = None  # refreshes a token caused are rate-limited
        self._absent: dict[str, float] = {}  # kids a good refresh found absent, and when
        self._inflight: asyncio.Task[bool] | None = None
        self.last_error: str | None = None

    def use_session(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def refresh(self) -> bool:
        """Load the key set now (joining a refresh in flight); True when a good set is in force."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    async def refresh_for_unknown_kid(self, kid: str | None = None) -> None:
        """Refresh because a token named an unknown ``kid`` (or keys are missing): at most once per interval,
        and never again for a kid a good refresh found absent within :data:`ABSENT_FOR`.

        Joins a refresh already in flight. Scheduled refreshes do not count against the interval.
        """
        if self._inflight is None:
            if kid is not None and self._known_absent(kid):
                return
            if not self._may_refresh():
                return
            self._last_token_refresh = self._clock()
        await self.refresh()
        keys = self.keys
        if kid is not None and keys is not None and kid not in keys.by_kid and self.last_error is None:
            if len(self._absent) >= ABSENT_MAX:
                self._absent.clear()  # one entry per refresh at most per kid: a flood only resets it
            self._absent[kid] = self._clock()

    def _known_absent(self, kid: str) -> bool:
        noted = self._absent.get(kid)
        return noted is not None and 0 <= self._clock() - noted < ABSENT_FOR

    def _may_refresh(self) -> bool:
        if self._last_token_refresh is None:
            return True
        elapsed = self._clock() - self._last_token_refresh
        return elapsed < 0 or elapsed >= self._min_interval  # a clock that went back never blocks

    async def aclose(self) -> None:
        """Cancel a refresh in flight (the session it uses is about to close)."""
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.gather(self._inflight, return_exceptions=True)

    def _clear_inflight(self, _task: asyncio.Task[bool]) -> None:
        self._inflight = None

    async def _refresh(self) -> bool:
        try:
            raw = await self._read()
            if raw != self._last_raw:
                self.keys = parse_jwks(raw, self.allowed, self.config.issuer)
                self._last_raw = raw
                log.info("jwks_loaded", issuer=self.config.issuer, keys=self.keys.size)
            self.last_error = None
        except (JwksError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._failed(exc)
        return self.keys is not None

    def _failed(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if self._failures is not None:
            self._failures.inc()
        log.warning("jwks_fetch_failed", issuer=self.config.issuer, reason=self.last_error,
                    keeping_previous_keys=self.keys is not None)

    async def _read(self) -> bytes:
        if self.config.jwks_file is not None:
            return await asyncio.to_thread(self.config.jwks_file.read_bytes)
        if self.config.jwks_uri is None or self._session is None:
            raise JwksError("no jwks_file or jwks_uri to load keys from")
        return await self._fetch(self.config.jwks_uri, self._session)

    async def _fetch(self, url: str, session: aiohttp.ClientSession) -> bytes:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with session.get(url, ssl=self._ssl or True, allow_redirects=False, timeout=timeout,
                               headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise JwksError(f"jwks endpoint answered HTTP {resp.status}, expected 200")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError(f"jwks is larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)


def _describe(exc: BaseException) -> str:
    """A failure reason for logs: our own messages, or the exception's type (never a body)."""
    if isinstance(exc, JwksError):
        return str(exc)
    if isinstance(exc, ssl.SSLError) or isinstance(exc, aiohttp.ClientSSLError):
        return f"tls error ({type(exc).__name__})"
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out after {FETCH_TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


async def refresh_periodically(sources: list[KeySource], interval: float) -> None:
    """Refresh every source every ``interval`` seconds, off the request path, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        results = await asyncio.gather(*(source.refresh() for source in sources), return_exceptions=True)
        for source, result in zip(sources, results):
            if isinstance(result, Exception):  # a bug, not a fetch failure: logged, old keys kept
                log.error("jwks_refresh_error", issuer=source.config.issuer, error=type(result).__name__)
