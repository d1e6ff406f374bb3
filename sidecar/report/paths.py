"""Path patterns generalized from observed paths, in memory bounded by what is distinct.

A :class:`PathTrie` holds one node per distinct generalized segment. A segment that looks like an
identifier (digits, a UUID, a long hex or token string) becomes ``*`` at once; a node that has seen
more than :data:`LITERAL_CAP` distinct literal children folds them into one ``*`` child, and so
does a node that has a ``*`` child and meets another literal. The patterns are policy globs
(``sidecar.policy.globs``): ``*`` matches one non-empty segment, so an empty segment (``/a/``)
stays literal. A path cut short in the event (``...[truncated from N chars]``) is kept as the
prefix before its cut segment followed by ``/**``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LITERAL_CAP = 16
STAR = "*"
TRUNCATED = "...[truncated from "
_IDENTIFIER = re.compile(
    r"^(?:\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{16,})$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{24,}$")


def generalize(segment: str) -> str:
    """``*`` for a segment that names one thing among many (an id), else the segment itself."""
    if not segment:
        return segment
    if STAR in segment or _IDENTIFIER.match(segment):
        return STAR
    if _TOKEN.match(segment) and any(c.isdigit() for c in segment):
        return STAR
    return segment


@dataclass
class _Node:
    count: int = 0  # paths that end here
    children: dict[str, _Node] = field(default_factory=dict)

    def absorb(self, other: _Node) -> None:
        self.count += other.count
        for key, child in other.children.items():
            mine = self.children.get(key)
            if mine is None:
                self.children[key] = child
            else:
                mine.absorb(child)
        self.fold()

    def fold(self) -> None:
        """Literal children go into ``*`` when there is a ``*`` or more literals than the cap."""
        literals = [k for k in self.children if k not in (STAR, "")]
        if not literals or (STAR not in self.children and len(literals) <= LITERAL_CAP):
            return
        star = self.children.setdefault(STAR, _Node())
        for key in literals:
            star.absorb(self.children.pop(key))

    def child(self, segment: str) -> _Node:
        if segment and STAR in self.children:
            segment = STAR
        node = self.children.get(segment)
        if node is None:
            node = self.children[segment] = _Node()
            self.fold()
            node = self.children.get(segment) or self.children[STAR]
        return node


class PathTrie:
    """Observed paths folded into glob patterns, with the number of requests each covers."""

    def __init__(self) -> None:
        self._root = _Node()
        self._prefixes: dict[str, int] = {}  # truncated paths: pattern -> count

    def add(self, path: str, count: int = 1) -> None:
        if TRUNCATED in path:
            self._add_truncated(path, count)
            return
        node = self._root
        for segment in path.split("/")[1:]:
            node = node.child(generalize(segment))
        node.count += count

    def _add_truncated(self, path: str, count: int) -> None:
        kept = path[:path.index(TRUNCATED)].rsplit("/", 1)[0]
        segments = [generalize(s) for s in kept.split("/")[1:]]
        pattern = "/" + "/".join(segments + ["**"]) if segments else "/**"
        if pattern in self._prefixes or len(self._prefixes) < LITERAL_CAP:
            self._prefixes[pattern] = self._prefixes.get(pattern, 0) + count
        else:
            self._prefixes["/**"] = self._prefixes.get("/**", 0) + count

    def patterns(self) -> dict[str, int]:
        """Pattern -> requests it covers, in a stable order."""
        out: dict[str, int] = {}
        stack: list[tuple[tuple[str, ...], _Node]] = [((), self._root)]
        while stack:
            segments, node = stack.pop()
            if node.count and segments:
                out["/" + "/".join(segments)] = node.count
            for key in sorted(node.children, reverse=True):
                stack.append(((*segments, key), node.children[key]))
        out.update(self._prefixes)
        return dict(sorted(out.items()))
