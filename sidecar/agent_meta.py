"""``agent:`` in ``sidecar.yaml``: who the agent is, declared by its operator.

Besides ``name`` and ``environment``: ``owner``, ``purpose``, ``trust_level`` (one of the declared
ordered ``trust_levels``, lowest first; default ``[sandbox, internal, production]``),
``data_classes`` and free ``labels``. Every value is bounded and checked here, once: they go
into every trust-decision event, into CEL (``agent.trust_level``, ``agent.trust_rank``,
``agent.labels``...), into the inventory and, except labels, into one info metric.
"""

from __future__ import annotations

import re
from typing import Any

from sidecar.config_model import DEFAULT_TRUST_LEVELS, AgentMeta
from sidecar.fields import Fields

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # trust levels and data classes
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
MAX_TRUST_LEVELS = 16
MAX_DATA_CLASSES = 32
MAX_LABELS = 32
MAX_OWNER = 256
MAX_PURPOSE = 1024


def parse_agent(f: Fields) -> tuple[str, str, AgentMeta]:
    """(name, environment, metadata) of ``agent:``; problems go into ``f``'s error list."""
    name = f.text("name", "agent")
    environment = f.text("environment", "development")
    owner = _bounded(f, "owner", MAX_OWNER)
    purpose = _bounded(f, "purpose", MAX_PURPOSE)
    levels = _names(f, "trust_levels", MAX_TRUST_LEVELS, DEFAULT_TRUST_LEVELS) or DEFAULT_TRUST_LEVELS
    level = f.text("trust_level")
    if level is not None and level not in levels:
        f.error("trust_level", f"must be one of the declared trust_levels ({', '.join(levels)}), got {level!r}")
        level = None
    data_classes = _names(f, "data_classes", MAX_DATA_CLASSES, ())
    labels = _labels(f)
    f.done()
    return name, environment, AgentMeta(owner, purpose, level, levels, data_classes, labels)


def _bounded(f: Fields, key: str, limit: int) -> str | None:
    value = f.text(key)
    if value is not None and len(value) > limit:
        f.error(key, f"must be at most {limit} characters, got {len(value)}")
        return None
    return value


def _names(f: Fields, key: str, limit: int, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of distinct lowercase names (``[a-z][a-z0-9_-]*``), at most ``limit`` of them."""
    values = f.text_list(key, default)
    bad = [v for v in values if not NAME.match(v)]
    if bad:
        f.error(key, f"names must be lowercase letters, digits, _ or - (starting with a letter), got {bad[0]!r}")
    elif len(set(values)) != len(values):
        f.error(key, "must not repeat a name")
    elif len(values) > limit:
        f.error(key, f"must have at most {limit} entries, got {len(values)}")
    else:
        return values
    return default


def _labels(f: Fields) -> tuple[tuple[str, str], ...]:
    raw = f.mapping("labels")
    if len(raw) > MAX_LABELS:
        f.error("labels", f"must have at most {MAX_LABELS} entries, got {len(raw)}")
        return ()
    labels = []
    for key, value in sorted(raw.items()):
        problem = _label_problem(key, value)
        if problem:
            f.error(f"labels.{key}", problem)
        else:
            labels.append((key, value))
    return tuple(labels)


def _label_problem(key: str, value: Any) -> str | None:
    if not LABEL_KEY.match(key):
        return "label keys must be 1-63 lowercase letters, digits, '.', '_', '-' or '/', starting and ending " \
               "with a letter or digit"
    if not isinstance(value, str) or not LABEL_VALUE.match(value):
        return "label values must be strings of at most 63 letters, digits, '.', '_' or '-', starting and " \
               "ending with a letter or digit (or empty)"
    return None
