"""What a request says besides its request line, and what it must not carry.

Frameworks act on more than the request line: Symfony, Laravel, Rails and Express's
method-override read ``X-HTTP-Method-Override`` (Google APIs, and ``X-HTTP-Method`` /
``X-Method-Override``) or a ``_method`` query or form field, and turn an allowed POST into a
DELETE; IIS and Symfony read ``X-Original-URL`` / ``X-Rewrite-URL`` as the path. The agent's own
bearer token can ride in an ``access_token`` query or form field (RFC 6750 §2.2, §2.3), past the
header strip set. :func:`screen` looks at exactly what will be forwarded (the headers after the
drop set, the raw query, a form body) and:

- refuses an override or an ``access_token`` the upstream does not list in ``pass_headers``
  (``request_override``, ``credential_parameter``: 400, naming the header or field, never its value);
- for an override that is passed, returns the other :class:`Reading` of the request, which policy
  must allow as well as the request line (``PolicySet.decide(facts, *reading.alternatives(facts))``).

Parameter names are compared after form decoding (``%5Fmethod`` is ``_method``), case-sensitively
as the frameworks do; fields are split on ``&`` and ``;`` (some servers accept either).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NamedTuple
from urllib.parse import unquote_plus

from multidict import CIMultiDict

from sidecar.errors import RequestRefused
from sidecar.http.target import PathOptions, canonical_path, strip_base
from sidecar.policy.facts import Facts

METHOD_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
URL_HEADERS = ("X-Original-URL", "X-Rewrite-URL")
METHOD_PARAM = "_method"
TOKEN_PARAM = "access_token"
_METHOD = re.compile(r"[A-Za-z]+")
_SEPARATORS = re.compile(r"[&;]")


class Reading(NamedTuple):
    """The method and canonical rule path an upstream honouring a passed override acts on."""

    method: str | None = None
    path: str | None = None

    def alternatives(self, facts: Facts) -> tuple[Facts, ...]:
        """The request as the upstream may read it, every combination besides the request line (none for a
        request without a passed override, nearly every one: no facts are copied then)."""
        if self.method is None and self.path is None:
            return ()
        methods = dict.fromkeys((facts.method, self.method or facts.method))
        paths = dict.fromkeys((facts.path, self.path or facts.path))
        return tuple(replace(facts, method=m, path=p) for m in methods for p in paths
                     if (m, p) != (facts.method, facts.path))

    def event(self) -> dict[str, str | None] | None:
        """``target.override`` of the trust-decision event."""
        return None if self == NONE else {"method": self.method, "path": self.path}


NONE = Reading()


def screen(headers: CIMultiDict[str], query: str, form: bytes | None, passed: frozenset[str],
           paths: PathOptions, base_path: str) -> Reading:
    """Refuse what is not passed; the other reading of what is (``NONE`` when there is none)."""
    params = _params(query, "query") + (_params(form.decode("latin-1"), "form") if form else [])
    for name, where, _ in params:
        if name == TOKEN_PARAM and TOKEN_PARAM not in passed:
            raise RequestRefused("credential_parameter", f"request: an {TOKEN_PARAM} {where} parameter would "
                                 "carry a bearer token past the sidecar (RFC 6750); send no credentials of "
                                 "your own: the sidecar attaches the upstream's")
    methods = _overrides(headers, METHOD_HEADERS, passed)
    methods += [value for name, where, value in params if name == METHOD_PARAM and _passed(name, where, passed)]
    targets = _overrides(headers, URL_HEADERS, passed)
    if not methods and not targets:
        return NONE
    return Reading(_one_method(methods), _one_path(targets, paths, base_path))


def _params(raw: str, where: str) -> list[tuple[str, str, str]]:
    """(name, where, value) of the screened fields; cheap when none can be there."""
    if not raw or ("%" not in raw and METHOD_PARAM not in raw and TOKEN_PARAM not in raw):
        return []
    found = []
    for field in _SEPARATORS.split(raw):
        name, _, value = field.partition("=")
        name = unquote_plus(name, encoding="latin-1")
        if name in (METHOD_PARAM, TOKEN_PARAM):
            found.append((name, where, unquote_plus(value, encoding="latin-1")))
    return found


def _passed(name: str, where: str, passed: frozenset[str]) -> bool:
    if name.lower() in passed:
        return True
    raise RequestRefused("request_override", f"request: a {name} {where} parameter would make the upstream "
                         "act on another method than the one policy decided; list it in pass_headers to "
                         "have both decided")


def _overrides(headers: CIMultiDict[str], names: tuple[str, ...], passed: frozenset[str]) -> list[str]:
    values: list[str] = []
    for name in names:
        found = headers.getall(name, ())
        if found and name.lower() not in passed:
            raise RequestRefused("request_override", f"request: {name} would make the upstream act on another "
                                 "request than the one policy decided; list it in pass_headers to have both "
                                 "decided")
        values.extend(found)
    return values


def _one_method(values: list[str]) -> str | None:
    methods = {v.strip().upper() for v in values}
    if not methods:
        return None
    if len(methods) > 1 or not _METHOD.fullmatch(next(iter(methods))):
        raise RequestRefused("request_override", "request: method overrides must name one HTTP method "
                             "(letters only), the same in every override")
    return methods.pop()


def _one_path(values: list[str], paths: PathOptions, base_path: str) -> str | None:
    """The rule path of an X-Original-URL / X-Rewrite-URL (a path from the server's root)."""
    targets = {v.strip().partition("?")[0] for v in values}
    if not targets:
        return None
    if len(targets) > 1:
        raise RequestRefused("request_override", "request: X-Original-URL and X-Rewrite-URL must name one path")
    path = strip_base(canonical_path(targets.pop(), paths), base_path)
    if path is None:
        raise RequestRefused("request_override", "request: X-Original-URL names a path outside the "
                             "upstream's base path")
    return path

