"""What a trust-decision event records of a request's headers: what ``sidecar replay`` needs, never a secret.

``target.headers`` holds the values (as policy saw them: the forwarded headers, lowercase names)
of the headers a loaded rule reads by name (``PolicySet.headers_read``: a rule's ``headers`` keys
and the names its ``when.expr`` indexes) or ``logging.event_headers`` lists. A header is never
recorded when it can carry a credential (:func:`sidecar.http.headers.recordable`: ``Authorization``,
``Proxy-Authorization``, ``Cookie`` and the like, the headers configured credentials are placed in,
any name that reads like a secret), nor when the sidecar's redactor would mask its value, nor when
it is too large to record whole (:data:`VALUE_MAX`, :data:`VALUES_MAX`, :data:`RECORDED_MAX`,
:data:`RECORDED_CHARS_MAX` for all values together, in name order):
a value cut short would be a different value to decide on.

``target.header_names`` lists the name of every header policy saw, sorted, so that replay knows
a header the event has no value for was absent (then it is decided as absent) or present but not
recorded (then a rule that reads it makes the request undecidable, never a false change). It is
null when there were more than :data:`NAMES_MAX` or a name longer than :data:`NAME_MAX`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from sidecar.http.headers import recordable
from sidecar.observe.decision_log import Redactor

VALUE_MAX = 1024  # characters of one value
VALUES_MAX = 8  # values of one header
RECORDED_MAX = 16  # headers with values
RECORDED_CHARS_MAX = 4096  # characters of all recorded values together: an agent cannot make events large
NAMES_MAX = 64
NAME_MAX = 128

Recorded = tuple[dict[str, list[str]], list[str] | None]


class HeaderCapture:
    """The headers one sidecar's events record: the current policy's names and the configured ones."""

    def __init__(self, configured: Iterable[str], credential_headers: Iterable[str],
                 policy_names: Callable[[], frozenset[str]], redactor: Redactor) -> None:
        self._configured = frozenset(n.lower() for n in configured)
        self._credential_headers = frozenset(n.lower() for n in credential_headers)
        self._policy_names, self._redactor = policy_names, redactor
        self._names: tuple[frozenset[str] | None, tuple[str, ...]] = (None, ())

    def names(self) -> tuple[str, ...]:
        """The recordable names, computed again only when the policy's change (a reload)."""
        wanted = self._policy_names()
        cached, names = self._names
        if wanted is not cached:
            names = tuple(sorted(n for n in wanted | self._configured
                                 if len(n) <= NAME_MAX and recordable(n, self._credential_headers)))
            self._names = (wanted, names)
        return names

    def capture(self, headers: Mapping[str, tuple[str, ...]]) -> Recorded:
        """(values of the recorded headers present, every name present or None) of the headers policy saw."""
        present = list(headers)
        values: dict[str, list[str]] = {}
        room = RECORDED_CHARS_MAX
        for name in self.names():
            found = headers[name] if name in present else None
            if found is None or len(values) >= RECORDED_MAX or not self._fits(found):
                continue
            size = sum(map(len, found))
            if size <= room:
                values[name], room = list(found), room - size
        if not present:
            return values, []
        if len(present) > NAMES_MAX or max(map(len, present)) > NAME_MAX or self._redactor.masks("\n".join(present)):
            return values, None
        present.sort()
        return values, present

    def _fits(self, found: tuple[str, ...]) -> bool:
        return (len(found) <= VALUES_MAX and all(len(v) <= VALUE_MAX for v in found)
                and not self._redactor.masks("\n".join(found)))
