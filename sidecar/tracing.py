"""W3C Trace Context: keep the caller's trace id, start a new span for our hop.

Ids are random, not secret: a fast PRNG is enough (never all zeros, as the spec requires). They are
written with ``int.to_bytes().hex()``: a third of the cost of a ``:032x`` format spec.
"""

from __future__ import annotations

import random
import re
from typing import Mapping

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def traceparent_for(headers: Mapping[str, str]) -> tuple[str, str]:
    """(trace id, the traceparent to send on): the incoming trace when valid, else a new one."""
    incoming = headers.get("traceparent", "")
    m = _TRACEPARENT.match(incoming.strip()) if incoming else None
    if m and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
        trace_id, flags = m.group(1), m.group(3)
    else:
        trace_id, flags = (random.getrandbits(128) | 1).to_bytes(16, "big").hex(), "01"
    return trace_id, f"00-{trace_id}-{(random.getrandbits(64) | 1).to_bytes(8, 'big').hex()}-{flags}"
