"""Glob patterns of rules (``paths``, ``agents``, ``callers``, ``mcp``), compiled once into matchers.

``*`` matches within one ``/``-separated segment (a whole-segment ``*`` needs a non-empty segment),
``**`` as a whole segment matches any number of segments, including none: ``/tasks/**`` matches
``/tasks``, ``/tasks/`` and ``/tasks/a/b``. Matching is case-sensitive. Exact patterns become a set
lookup; the others one regex behind a cheap literal-prefix pre-check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from operator import attrgetter
from typing import Any

from sidecar.fields import Fields
from sidecar.policy.facts import Facts

_DOUBLE_STAR = re.compile(r"(?:^|/)\*\*(?:/|$)")
_DOUBLE_STAR_REGEX = {(True, True): "(?:/|/.*/)", (True, False): "(?:/.*)?", (False, True): "(?:.*/)?",
                      (False, False): ".*"}

Check = Callable[[Facts, datetime], bool]  # one compiled condition of a rule; the time is the decision's


def glob_regex(pattern: str) -> str:
    """``*`` within one segment, ``**`` as whole segments; raises ValueError for a stray ``**``."""
    out, pos = [], 0
    for m in _DOUBLE_STAR.finditer(pattern):
        out.append(_segments_regex(pattern[pos:m.start()]))
        token = m.group()
        out.append(_DOUBLE_STAR_REGEX[(token.startswith("/"), token.endswith("/"))])
        pos = m.end()
    out.append(_segments_regex(pattern[pos:]))
    return "".join(out)


def _segments_regex(text: str) -> str:
    parts = []
    for segment in text.split("/"):
        if "**" in segment:
            raise ValueError(f"'**' must be a whole segment, got {segment!r}")
        if segment == "*":
            parts.append("[^/]+")
        else:
            parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return "/".join(parts)


def _compile(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...], Callable[[str], Any] | None]:
    """Exact names (set lookup), the literal prefixes of the others (a cheap pre-check), one regex."""
    exact = frozenset(p for p in patterns if "*" not in p)
    wild = [p for p in patterns if "*" in p]
    if not wild:
        return exact, (), None
    regex = re.compile("|".join(f"(?:{glob_regex(w)})" for w in wild))
    # up to the first *, without the / that a ** may swallow (/tasks/** matches /tasks)
    return exact, tuple(w[:w.index("*")].rstrip("/") for w in wild), regex.fullmatch


def compile_globs(patterns: tuple[str, ...]) -> Callable[[str | None], bool]:
    """One matcher for a list of patterns."""
    exact, prefixes, fullmatch = _compile(patterns)
    if fullmatch is None:
        return lambda value: value in exact
    return lambda value: value in exact or (
        value is not None and value.startswith(prefixes) and fullmatch(value) is not None)


def glob_check(patterns: tuple[str, ...], attribute: str) -> Check:
    """The same matcher applied to one attribute of the facts (one call level less per request)."""
    exact, prefixes, fullmatch = _compile(patterns)
    get = attrgetter(attribute)
    if fullmatch is None:
        return lambda facts, now: get(facts) in exact

    def check(facts: Facts, now: datetime) -> bool:
        value = get(facts)
        return value in exact or (value is not None and value.startswith(prefixes) and fullmatch(value) is not None)

    return check


def patterns(f: Fields, key: str, *, must_start: str = "") -> tuple[str, ...]:
    """A list of glob patterns, checked; empty when absent or invalid."""
    found = f.text_list(key)
    for i, pattern in enumerate(found):
        try:
            glob_regex(pattern)
        except ValueError as exc:
            f.error(f"{key}[{i}]", str(exc))
            return ()
        if must_start and not pattern.startswith(must_start):
            f.error(f"{key}[{i}]", f"must start with {must_start!r}, got {pattern!r}")
    return found
