"""Bearer JWTs on inbound requests and approver tokens: verified once into a :class:`VerifiedToken`.

The order of checks, each refusal an ``IdentityRefused("token_invalid", ...)`` whose message names
what was expected and never any part of the token:

1. size (at most ``MAX_TOKEN_BYTES``, before any parsing), exactly three base64url segments;
2. header: ``alg`` asymmetric (never ``none`` in any case, never HMAC); no ``jku``, ``x5u``,
   ``jwk`` or ``x5c`` (keys never come from the token); no ``crit`` (we understand no
   extension) and no ``b64``; ``kid`` a bounded dictionary key and nothing else;
3. the unverified ``iss`` picks the configured issuer by exact string comparison (no trailing
   slash or case normalization), then ``alg`` must be in that issuer's allow-list and ``typ``
   must match when configured (case-insensitive, optional ``application/`` prefix, RFC 8725 §3.11);
4. one dictionary lookup of the key (an unknown ``kid`` may refresh the JWKS, rate-limited);
   the key's algorithms are the issuer's list intersected with what its type can verify;
5. one signature verification with PyJWT's algorithm object and the parsed key object;
6. claims: ``exp`` required, ``iat``/``nbf`` not in the future beyond leeway, all NumericDates
   JSON numbers, lifetime at most ``max_lifetime``, ``aud`` matching, ``sub`` a non-empty string.

Successful results are cached by the token's sha256 (and the audience asked for) until ``exp``
plus leeway, and only while the key set they were verified with is still in force.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import aiohttp
import orjson
import structlog

from sidecar.config_model import JwtIssuerConfig
from sidecar.errors import IdentityRefused
from sidecar.fields import Secret
from sidecar.identity.jwks import ASYMMETRIC_ALGORITHMS, KeySet, KeySource, VerificationKey, refresh_periodically

if TYPE_CHECKING:
    from sidecar.observe.metrics import Metrics

log = structlog.get_logger("sidecar.identity.jwt")

MAX_TOKEN_BYTES = 8192
MAX_KID_CHARS = 128
MAX_ACT_DEPTH = 8
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_KID = re.compile(rf"[A-Za-z0-9._~+/=:-]{{1,{MAX_KID_CHARS}}}")
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 §2.1 b64token
_KEYS_FROM_TOKEN = ("jku", "x5u", "jwk", "x5c")


@functools.cache
def _verifiers() -> Mapping[str, Any]:
    """PyJWT's asymmetric algorithms, imported when the first token is verified: a sidecar without
    ``jwt_issuers`` never loads PyJWT (about 0.1 s of start-up, issue 16)."""
    from jwt.algorithms import get_default_algorithms

    return {alg: impl for alg, impl in get_default_algorithms().items() if alg in ASYMMETRIC_ALGORITHMS}


def _refused(message: str) -> IdentityRefused:
    return IdentityRefused("token_invalid", f"identity: {message}")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A bearer token whose signature and claims were verified."""

    issuer: str
    subject: str
    actor_type: str  # "human" | "workload"
    client_id: str | None  # client_id or azp claim
    audiences: tuple[str, ...]
    expires_at: float
    act_chain: tuple[str, ...]  # subjects of nested `act` claims, outermost first
    claims: Mapping[str, Any] = field(repr=False)
    token: Secret = field(repr=False)  # the raw token, for RFC 8693 subject_token; masked


@dataclass(frozen=True, slots=True)
class _Parsed:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class _Issuer:
    config: JwtIssuerConfig
    algorithms: frozenset[str]
    audiences: frozenset[str]
    typ: str | None
    source: KeySource


@dataclass(frozen=True, slots=True)
class _Cached:
    result: VerifiedToken
    keys: KeySet
    until: float


def bearer_token(authorization_header_values: Sequence[str]) -> str | None:
    """The token of the one ``Authorization: Bearer <token>`` header, or None when there is none."""
    if not authorization_header_values:
        return None
    if len(authorization_header_values) > 1:
        raise _refused("expected at most one authorization header")
    scheme, _, token = authorization_header_values[0].strip(" \t").partition(" ")
    token = token.lstrip(" ")
    if scheme.lower() != "bearer" or not _B64TOKEN.fullmatch(token):
        raise _refused("authorization header must be 'Bearer <token>'")
    return token


def _normalize_typ(typ: str) -> str:
    typ = typ.lower()
    return typ[len("application/"):] if typ.startswith("application/") else typ


def _b64_json(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        raise _refused(f"token {what} must be base64url-encoded json") from None
    if not isinstance(value, dict):
        raise _refused(f"token {what} must be a json object")
    return value


def _parse(token: str) -> _Parsed:
    """Split and decode a token whose type and size :meth:`JwtVerifier.verify` has checked."""
    if not _TOKEN.fullmatch(token):
        raise _refused("bearer token must be a JWS of exactly three base64url segments")
    header_b64, claims_b64, signature_b64 = token.split(".")
    header = _b64_json(header_b64, "header")
    claims = _b64_json(claims_b64, "payload")
    try:
        signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    except binascii.Error:
        raise _refused("token signature must be base64url-encoded") from None
    return _Parsed(header, claims, f"{header_b64}.{claims_b64}".encode("ascii"), signature)


def _check_header(header: dict[str, Any]) -> tuple[str, str | None]:
    """The header's ``alg`` and ``kid``, after every check that needs no issuer."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
        raise _refused(f"token alg must be one of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))} "
                       "(none and hmac are never accepted)")
    for name in _KEYS_FROM_TOKEN:
        if name in header:
            raise _refused(f"token header must not carry {name}: keys come only from the issuer's jwks")
    if "crit" in header or "b64" in header:
        raise _refused("token header must not carry crit or b64: no extension is supported")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not _KID.fullmatch(kid)):
        raise _refused(f"token kid must be 1-{MAX_KID_CHARS} ascii letters, digits or . _ ~ + / = : -")
    return alg, kid


def _check_issuer_header(header: dict[str, Any], alg: str, issuer: _Issuer) -> None:
    if alg not in issuer.algorithms:
        raise _refused(f"token alg must be one of the issuer's algorithms: {', '.join(sorted(issuer.algorithms))}")
    if issuer.typ is not None:
        typ = header.get("typ")
        if not isinstance(typ, str) or _normalize_typ(typ) != issuer.typ:
            raise _refused(f"token header typ must be {issuer.config.typ}")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refused(f"token claim {name} must be a json number (a numericdate)")
    return float(value)


def _check_times(claims: Mapping[str, Any], cfg: JwtIssuerConfig, now: float) -> float:
    """Check ``exp``, ``nbf``, ``iat`` and the lifetime; return ``exp``."""
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    iat = _numeric_date(claims, "iat")
    if exp is None:
        raise _refused("token must carry an exp claim")
    if now >= exp + cfg.leeway:
        raise _refused("token has expired (exp is in the past)")
    if nbf is not None and nbf > now + cfg.leeway:
        raise _refused("token is not yet valid (nbf is in the future)")
    if iat is not None and iat > now + cfg.leeway:
        raise _refused("token iat must not be in the future")
    if exp - (iat if iat is not None else now) > cfg.max_lifetime:
        raise _refused(f"token lifetime (exp - iat) must be at most {cfg.max_lifetime:g}s")
    return exp


def _audiences(claims: Mapping[str, Any], expected: frozenset[str]) -> tuple[str, ...]:
    aud = claims.get("aud")
    auds = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not auds or not all(isinstance(a, str) for a in auds):
        raise _refused("token must carry an aud claim: a string or a list of strings")
    if expected.isdisjoint(auds):
        raise _refused(f"token aud must include one of: {', '.join(sorted(expected))}")
    return auds


def _string_claim(claims: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _refused(f"token claim {name} must be a non-empty string")
    return value


def _act_chain(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Subjects of nested ``act`` claims (RFC 8693 §4.1), the current actor first."""
    chain: list[str] = []
    act = claims.get("act")
    while act is not None:
        if not isinstance(act, dict) or len(chain) >= MAX_ACT_DEPTH:
            raise _refused(f"token act claim must be an object with sub, nested at most {MAX_ACT_DEPTH} deep")
        sub = act.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _refused("token act claim must carry sub: a non-empty string")
        chain.append(sub)
        act = act.get("act")
    return tuple(chain)


MACHINE_GRANTS = frozenset({"client-credentials", "client_credentials", "urn:ietf:params:oauth:grant-type:jwt-bearer"})


def _actor_type(mode: str, subject: str, client_id: str | None, claims: Mapping[str, Any]) -> str:
    """``auto``: human only when client_id/azp is present and differs from sub, and nothing marks the
    token as a machine's: Auth0's ``gty: client-credentials`` or ``@clients`` subjects (whose azp also
    differs from sub) would otherwise pass for a human and satisfy ``delegation: required``.
    Set ``actor:`` explicitly per issuer where the IdP's tokens say more."""
    if mode in ("human", "workload"):
        return mode
    if client_id is None or client_id == subject:
        return "workload"
    if claims.get("gty") in MACHINE_GRANTS or subject.endswith("@clients"):
        return "workload"
    return "human"


def _verified(token: str, claims: dict[str, Any], issuer: _Issuer, audience: str | None,
              now: float) -> VerifiedToken:
    """Check the claims of a token whose signature verified."""
    cfg = issuer.config
    exp = _check_times(claims, cfg, now)
    auds = _audiences(claims, frozenset((audience,)) if audience is not None else issuer.audiences)
    subject: str = _string_claim(claims, "sub", required=True)  # type: ignore[assignment]
    client_id = _string_claim(claims, "client_id") or _string_claim(claims, "azp")
    return VerifiedToken(cfg.issuer, subject, _actor_type(cfg.actor, subject, client_id, claims), client_id, auds,
                         exp, _act_chain(claims), MappingProxyType(claims), Secret(token, "bearer"))


class JwtVerifier:
    """Verifies bearer JWTs from the configured issuers; owns their key sets and refresh."""

    def __init__(self, issuers: Sequence[JwtIssuerConfig], *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, cache_size: int = 1024,
                 min_refresh_interval: float = 30.0, refresh_interval: float = 300.0) -> None:
        self._clock = clock
        self._issuers = {cfg.issuer: self._issuer(cfg, metrics, min_refresh_interval) for cfg in issuers}
        self._cache: dict[tuple[bytes, str | None], _Cached] = {}
        self._cache_size = cache_size
        self._refresh_interval = refresh_interval
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None

    def _issuer(self, cfg: JwtIssuerConfig, metrics: Metrics | None, min_interval: float) -> _Issuer:
        algorithms = frozenset(cfg.algorithms) & ASYMMETRIC_ALGORITHMS
        if len(algorithms) != len(set(cfg.algorithms)):
            log.warning("jwt_algorithms_dropped", issuer=cfg.issuer,
                        reason="only asymmetric algorithms are accepted; none and HMAC never are")
        source = KeySource(cfg, algorithms, metrics=metrics, clock=self._clock, min_refresh_interval=min_interval)
        typ = _normalize_typ(cfg.typ) if cfg.typ else None
        return _Issuer(cfg, algorithms, frozenset(cfg.audiences), typ, source)

    async def start(self) -> None:
        """Load every issuer's keys (failures are logged and counted, not raised) and start refreshing."""
        if any(i.config.jwks_uri for i in self._issuers.values()):
            self._session = aiohttp.ClientSession()
            for issuer in self._issuers.values():
                issuer.source.use_session(self._session)
        await self.reload()
        if self._refresh_interval > 0 and self._issuers:
            sources = [i.source for i in self._issuers.values()]
            self._refresher = asyncio.create_task(refresh_periodically(sources, self._refresh_interval))

    async def reload(self) -> bool:
        """Re-read every key set now; a failure keeps the previous set. True when all are usable."""
        await asyncio.gather(*(i.source.refresh() for i in self._issuers.values()))
        return self.ready

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        await asyncio.gather(*(i.source.aclose() for i in self._issuers.values()))
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        """Every issuer has a usable key set."""
        return all(i.source.keys is not None for i in self._issuers.values())

    async def verify(self, token: str, *, audience: str | None = None) -> VerifiedToken:
        """Verify a bearer token; ``audience`` replaces the issuer's audiences (approver tokens)."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise _refused(f"bearer token must be a string of at most {MAX_TOKEN_BYTES} bytes")
        now = self._clock()
        cache_key = (hashlib.sha256(token.encode()).digest(), audience) if self._cache_size else None
        cached = self._cached(cache_key, now)
        if cached is not None:
            return cached
        parsed = _parse(token)
        alg, kid = _check_header(parsed.header)
        issuer = self._issuer_of(parsed.claims)
        _check_issuer_header(parsed.header, alg, issuer)
        keys, key = await self._key(issuer, kid, alg)
        if not _verifiers()[alg].verify(parsed.signing_input, key.key, parsed.signature):
            raise _refused("token signature does not verify with the issuer's key")
        result = _verified(token, parsed.claims, issuer, audience, now)
        if cache_key is not None:
            self._remember(cache_key, _Cached(result, keys, result.expires_at + issuer.config.leeway))
        return result

    def _issuer_of(self, claims: Mapping[str, Any]) -> _Issuer:
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _refused("token iss must be exactly one of the configured issuers")
        return issuer

    async def _key(self, issuer: _Issuer, kid: str | None, alg: str) -> tuple[KeySet, VerificationKey]:
        keys = issuer.source.keys
        if keys is None or (kid is not None and kid not in keys.by_kid):
            await issuer.source.refresh_for_unknown_kid(kid)
            keys = issuer.source.keys
        if keys is None:
            raise _refused("no verification keys could be loaded for the token's issuer (jwks unavailable)")
        if kid is None:
            return keys, self._only_key(keys, alg)
        for key in keys.by_kid.get(kid, ()):
            if alg in key.algorithms:
                return keys, key
        if kid in keys.by_kid:
            raise _refused("token alg does not match the type of the key named by its kid")
        failed = " (jwks refresh failed)" if issuer.source.last_error else ""
        raise _refused(f"token kid is not in the issuer's key set{failed}")

    @staticmethod
    def _only_key(keys: KeySet, alg: str) -> VerificationKey:
        key = keys.only_key_for_alg.get(alg)
        if key is None:
            raise _refused("token has no kid: allowed only when the issuer has exactly one key for its alg")
        return key

    def _cached(self, cache_key: tuple[bytes, str | None] | None, now: float) -> VerifiedToken | None:
        entry = self._cache.get(cache_key) if cache_key is not None else None
        if entry is None:
            return None
        issuer = self._issuers[entry.result.issuer]
        if now >= entry.until or entry.keys is not issuer.source.keys:
            del self._cache[cache_key]  # type: ignore[arg-type]
            return None
        return entry.result

    def _remember(self, cache_key: tuple[bytes, str | None], entry: _Cached) -> None:
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[cache_key] = entry
