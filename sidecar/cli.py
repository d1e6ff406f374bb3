"""``sidecar``: run, validate, explain, test, replay, report, ca, demo, revoke, inventory, inject.

Exit codes: 0 success (explain: allow), 1 invalid config or input (test: a case failed), 2 usage
or config error (explain), 3 deny (replay: something allowed would be denied; report: its suggested
policy would change a decision), 4 approval required.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sidecar.config import config_path, load_config
from sidecar.config_model import Config
from sidecar.errors import ConfigInvalid
from sidecar.fields import parse_duration

if TYPE_CHECKING:
    from sidecar.identity.ca import CAError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="A zero-trust sidecar for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the sidecar"), ("validate", "check config and policy files")):
        c = sub.add_parser(name, help=text)
        c.add_argument("-c", "--config")
    e = sub.add_parser("explain", help="print the decision the config would make, sending nothing")
    e.add_argument("-c", "--config")
    e.add_argument("--url", required=True)
    e.add_argument("--direction", choices=("outbound", "inbound"), default="outbound")
    e.add_argument("--method", default="GET")
    e.add_argument("--agent")
    e.add_argument("--caller")
    e.add_argument("--header", action="append", default=[], metavar="K=V")
    e.add_argument("--body")
    e.add_argument("--task-principal")
    e.add_argument("--task-trigger")
    e.add_argument("--at")
    t = sub.add_parser("test", help="policy unit tests: described requests and the decisions they expect")
    t.add_argument("policy", nargs="+", metavar="POLICY_DIR_OR_FILE")
    t.add_argument("--cases", action="append", required=True, metavar="CASES.yaml")
    t.add_argument("-c", "--config")
    t.add_argument("--junit", metavar="FILE")
    rp = sub.add_parser("replay", help="what a candidate policy would change on logged exchanges")
    rp.add_argument("--events", required=True, metavar="FILE|-")
    rp.add_argument("--policy", action="append", required=True, metavar="POLICY_DIR_OR_FILE")
    rp.add_argument("-c", "--config")
    rep = sub.add_parser("report", help="an access review and a least-privilege policy from logged events")
    rep.add_argument("--events", required=True, metavar="FILE|-")
    rep.add_argument("--policy", action="append", metavar="POLICY_DIR_OR_FILE")  # default: the config's own
    rep.add_argument("-c", "--config")
    rep.add_argument("--format", choices=("text", "json", "html"), default="text")
    rep.add_argument("--out", metavar="FILE")
    rep.add_argument("--policy-out", metavar="FILE")  # also write the suggested policy here
    ca = sub.add_parser("ca", help="development CA").add_subparsers(dest="ca_command", required=True)
    init = ca.add_parser("init")
    init.add_argument("-c", "--config")
    init.add_argument("--trust-domain", default="sidecar.local")
    issue = ca.add_parser("issue")
    issue.add_argument("-c", "--config")
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--out", default=".")
    issue.add_argument("--ttl", default="1h")
    sub.add_parser("demo", help="a self-contained walk-through on loopback")
    r = sub.add_parser("revoke", help="revoke an agent, task, credential or subject")
    r.add_argument("-c", "--config")
    group = r.add_mutually_exclusive_group(required=True)
    for kind in ("agent", "task", "credential", "subject"):
        group.add_argument(f"--{kind}")
    r.add_argument("--ttl", default="24h")
    inv = sub.add_parser("inventory", help="what the running sidecar holds (--fleet: every sidecar on its bus)")
    inv.add_argument("-c", "--config")
    inv.add_argument("--fleet", action="store_true")
    inj = sub.add_parser("inject", help="the Kubernetes mutating admission webhook")
    inj.add_argument("--listen", required=True)
    inj.add_argument("--tls-cert", required=True)
    inj.add_argument("--tls-key", required=True)
    inj.add_argument("-c", "--config")
    return p


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(getattr(args, "config", None), os.environ))


def _load_or_report(args: argparse.Namespace) -> Config | None:
    """The config, or None after printing every problem with its path."""
    try:
        return _load(args)
    except ConfigInvalid as exc:
        _print_errors(exc)
        return None


def _print_errors(exc: ConfigInvalid) -> None:
    for error in exc.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{len(exc.errors)} problem(s) found", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from sidecar.app import build_policy

    try:
        config = _load(args)
        policy = build_policy(config, None)
    except ConfigInvalid as exc:
        _print_errors(exc)
        return 1
    warnings = list(config.warnings)
    problem = _interception_ca_problem(config)
    if problem is not None and problem.reason not in ("expired", "not_yet_valid"):
        print(f"error: {problem} ({problem.reason})", file=sys.stderr)
        print("1 problem(s) found", file=sys.stderr)
        return 1
    if problem is not None:  # sidecar run starts with it, but no agent will accept its leaves
        warnings.append(f"{problem} ({problem.reason})")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"ok: {config.source}: {len(config.outbound.upstreams)} upstream(s), {len(config.credentials)} "
          f"credential(s), policy {policy.version} from {len(config.policy.files)} file(s)")
    return 0


def _interception_ca_problem(config: Config) -> CAError | None:
    """What is wrong with the configured interception CA pair, as ``sidecar run`` (and its reloads) would find it."""
    from sidecar.identity.ca import CAError, check_interception_ca

    cert, key = config.outbound.intercept_ca_cert, config.outbound.intercept_ca_key
    if cert is None or key is None:
        return None
    try:
        check_interception_ca(cert, key, datetime.now(UTC))
    except CAError as exc:
        return exc
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.app import serve
    from sidecar.observe.decision_log import configure_logging

    config = _load_or_report(args)
    if config is None:
        return 1
    from sidecar.identity.ca import CAError

    configure_logging(config.log_level)
    _install_uvloop()
    try:
        return asyncio.run(serve(config))
    except ConfigInvalid as exc:
        _print_errors(exc)
        return 1
    except CAError as exc:  # the interception CA (or the development CA) cannot be used as it is
        print(f"error: sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a listener that cannot bind, an unreadable identity file
        print(f"error: sidecar: cannot start: {exc.strerror or exc}"
              f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}", file=sys.stderr)
        return 1


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_ca(args: argparse.Namespace) -> int:
    from sidecar.identity.ca import ca_init, ca_issue

    state_dir = _state_dir(args)
    try:
        if args.ca_command == "init":
            print(f"development CA: {ca_init(state_dir, args.trust_domain)}")
            return 0
        paths = ca_issue(state_dir, args.spiffe_id, Path(args.out), timedelta(seconds=parse_duration(args.ttl)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    path = config_path(getattr(args, "config", None), os.environ)
    if path.exists():
        try:
            return load_config(path).state_dir
        except ConfigInvalid:
            pass
    return Path(".sidecar")


def cmd_admin(args: argparse.Namespace) -> int:
    from sidecar.admin_client import inventory, revoke

    config = _load_or_report(args)
    if config is None:
        return 1
    if args.command == "inventory":
        return inventory(config, fleet=args.fleet)
    kind = next(k for k in ("agent", "task", "credential", "subject") if getattr(args, k))
    return revoke(config, kind, getattr(args, kind), args.ttl)


def cmd_explain(args: argparse.Namespace) -> int:
    from sidecar.explain import explain

    return explain(args)


def cmd_test(args: argparse.Namespace) -> int:
    from sidecar.policytest import policy_test

    return policy_test(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from sidecar.replay import replay_command

    return replay_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from sidecar.report import report_command

    return report_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import demo

    return demo()


def cmd_inject(args: argparse.Namespace) -> int:
    from sidecar.inject import run

    return run(args.listen, Path(args.tls_cert), Path(args.tls_key), Path(args.config) if args.config else None)


COMMANDS: dict[str, Any] = {
    "run": cmd_run, "validate": cmd_validate, "explain": cmd_explain, "ca": cmd_ca, "demo": cmd_demo,
    "revoke": cmd_admin, "inventory": cmd_admin, "inject": cmd_inject, "test": cmd_test, "replay": cmd_replay,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status: int = COMMANDS[args.command](args)
    return status


if __name__ == "__main__":
    sys.exit(main())
