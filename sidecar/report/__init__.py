"""``sidecar report --events FILE|- [--policy FILES] [--format text|json|html] [--out FILE]``.

An access review from trust-decision events: per agent what it used (upstreams, methods, path
patterns generalized from the observed paths, MCP tools, inbound callers, credentials by type,
standing or short-lived), what its rules allow that it never used and the rules nothing matched
(``--policy``, by default the config's own policy files), denials by reason, human-driven against
autonomous traffic, delegation against impersonation; and a suggested least-privilege policy that
allows exactly what was used, proved by re-deciding every logged exchange under it.

Two passes over the events: the first folds them into :class:`~sidecar.report.usage.Usage`
(memory bounded by what is distinct), the second re-decides them (:func:`~sidecar.report.suggest.prove`).
Standard input is spooled to a temporary file for the second pass. Exit codes: 0 done, 1
unusable config, policy or events, 3 when the proof does not hold: a used exchange the suggested
policy would decide otherwise, or one this config cannot decide again (the report says which).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import orjson

from sidecar.config_model import Config
from sidecar.errors import ConfigInvalid
from sidecar.policy.engine import PolicySet
from sidecar.report.render import render_text, report_data
from sidecar.report.review import Coverage, listed_rules
from sidecar.report.suggest import prove, suggest, to_yaml
from sidecar.report.usage import Usage


@contextmanager
def opened(name: str) -> Iterator[IO[bytes]]:
    """The events file, or standard input spooled to a temporary file (read twice)."""
    if name != "-":
        with open(name, "rb") as stream:
            yield stream
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.seek(0)
        yield spool


def trust_events(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The trust-decision events from the start of ``stream`` (``replay`` reads them the same way)."""
    from sidecar.replay import events

    stream.seek(0)
    return (event for _, event in events(stream))


def fold(stream: IO[bytes], coverage: Coverage) -> Usage:
    """The first pass; an event without the fields a report reads is refused with its line number."""
    from sidecar.replay import BadEvent, events

    usage = Usage()
    for number, event in events(stream):
        try:
            usage.add(event)
            coverage.add(event)
        except (KeyError, TypeError, AttributeError) as exc:
            field = exc.args[0] if isinstance(exc, KeyError) else "field"
            raise BadEvent(f"line {number}: not a trust-decision event: missing or malformed {field}") from None
    return usage


def build(stream: IO[bytes], config: Config, policy: PolicySet) -> dict[str, Any]:
    """The report's data: usage, review against ``policy``, the suggestion and its proof."""
    from sidecar.explain import candidate_policy

    coverage = Coverage(listed_rules(policy))
    usage = fold(stream, coverage)
    suggested = to_yaml(*suggest(usage, config), usage=usage)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "suggested.yaml"
        path.write_text(suggested, encoding="utf-8")
        proof = prove(trust_events(stream), config, candidate_policy(config, [path]))
    info = {"version": policy.version, "files": [str(f) for f in policy.files]}
    return report_data(usage, coverage, info, suggested, proof)


def render(data: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    if fmt == "html":
        from sidecar.report.html import render_html

        return render_html(data)
    return render_text(data)


def report_command(args: argparse.Namespace) -> int:
    from sidecar.explain import load_candidate
    from sidecar.replay import BadEvent

    loaded = load_candidate(args.config, args.policy)
    if loaded is None:
        return 1
    config, policy = loaded
    try:
        with opened(args.events) as stream:
            data = build(stream, config, policy)
    except BadEvent as exc:
        print(f"error: report: {args.events}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: report: cannot read {args.events}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ConfigInvalid as exc:  # the suggestion is checked by the loader: a defect here, said plainly
        for error in exc.errors:
            print(f"error: report: the suggested policy does not load: {error}", file=sys.stderr)
        return 1
    _write(args.out, render(data, args.format))
    if args.policy_out:
        Path(args.policy_out).write_text(data["suggested_policy"], encoding="utf-8")
    return 0 if data["proof"]["holds"] else 3


def _write(out: str | None, text: str) -> None:
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(out).write_text(text, encoding="utf-8")
