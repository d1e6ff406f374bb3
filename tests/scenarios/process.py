"""A real ``python -m sidecar run`` process: its config and policy written to a directory, its whole log
captured to a file, stopped with SIGTERM. What the offline tools (replay, report) are fed in tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.cli import main
from tests.harness import free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
LISTENERS = ("outbound", "health", "metrics", "admin")


class SidecarProcess:
    """``sidecar run -c DIR/sidecar.yaml`` on loopback ports; ``config`` gets listen addresses and state_dir."""

    def __init__(self, directory: Path, config: dict[str, Any], policy: dict[str, Any]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in LISTENERS}
        (directory / "policy.yaml").write_text(yaml.safe_dump(policy))
        self.config = {**config, "state_dir": str(directory / "state"),
                       "policy": {"files": [str(directory / "policy.yaml")]}, "shutdown": {"drain": "1s"},
                       "outbound": {**config.get("outbound", {}), "listen": f"127.0.0.1:{self.ports['outbound']}"},
                       **{name: {"listen": f"127.0.0.1:{self.ports[name]}"} for name in LISTENERS[1:]}}
        self.config_file = directory / "sidecar.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log = directory / "run.log"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.ports['outbound']}"

    async def __aenter__(self) -> SidecarProcess:
        with self.log.open("wb") as out:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "run", "-c", str(self.config_file), cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=asyncio.subprocess.STDOUT)
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, self.ports["health"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()

    def events(self) -> list[dict[str, Any]]:
        """The trust-decision events of the log (after the process stopped: every line is whole)."""
        lines = [json.loads(line) for line in self.log.read_bytes().splitlines() if line.strip()]
        return [line for line in lines if line.get("event") == "trust_decision"]


def replay(capsys: Any, sidecar: SidecarProcess, policy: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """``sidecar replay`` of the process's whole log under ``policy``: its exit code and everything it printed."""
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(policy))
    code = main(["replay", "-c", str(sidecar.config_file), "--events", str(sidecar.log), "--policy", str(candidate)])
    out, err = capsys.readouterr()
    return code, out + err
