"""The build's one option: ``SIDECAR_MYPYC=1`` compiles the per-request modules with mypyc.

Without it (the default: ``pip install .``) the package is pure Python. With it, the modules every request
passes through are built as C extensions by mypyc from the same, strictly typed, source (about 18 % fewer
instructions per request, issue 16); everything else stays interpreted, and so does every module a compiled one
cannot be (a class with ``__slots__`` from aiohttp: ``http1/``; an async generator: ``forward/body.py``; a class
body assigning several names at once: ``observe/decision_log.py``). ``revocation.py``, ``tasks.py``,
``http/incoming.py`` and the upstream leg (``forward/transport.py``, ``http11.py``, ``connection.py``)
compiled, but five tests failed against them (Redis outage and tombstone ordering, an upstream's malformed
answer): they stay interpreted until each is understood. The
image (Dockerfile) is built with it, and ``scripts/test`` runs the suite under uvloop against a compiled
build in place (``build_ext --inplace``), then under asyncio against the pure one.

mypyc checks every annotated value at run time: a value that is not what the annotation says raises
``TypeError`` where the interpreter would have gone on; on the trust path that is a defect, answered
``internal_error`` (fail closed), never forwarded.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [  # the request's path, in the order it is walked (ARCHITECTURE.md); see the docstring for what is not
    "sidecar/routing.py",
    "sidecar/http/target.py",
    "sidecar/http/headers.py",
    "sidecar/tracing.py",
    "sidecar/grpc.py",
    "sidecar/policy/globs.py",
    "sidecar/policy/readings.py",
    "sidecar/policy/facts.py",
    "sidecar/policy/engine.py",
    "sidecar/credentials/cache.py",
    "sidecar/credentials/static.py",
    "sidecar/pipeline.py",
    "sidecar/credentials/echo.py",
    "sidecar/forward/relay.py",
    "sidecar/exchange.py",
    "sidecar/observe/headers.py",
    "sidecar/observe/metrics.py",
    "sidecar/observe/record.py",
]
MYPY = "mypy>=1.13"  # mypyc comes with mypy; the same release line the type check uses


def _extensions() -> list[object]:
    if os.environ.get("SIDECAR_MYPYC") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # the first pass of a PEP 517 build: only asks what the build needs (setup_requires)
        return []
    return list(mypycify(COMPILED, opt_level="3", group_name="sidecar._compiled"))  # its shared library inside the package


setup(ext_modules=_extensions(), setup_requires=[MYPY] if os.environ.get("SIDECAR_MYPYC") == "1" else [])
