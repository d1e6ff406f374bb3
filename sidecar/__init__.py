"""A zero-trust sidecar for AI agents."""

import sys

__version__ = "0.1.0"


def _import_structlog_without_rich() -> None:
    """structlog imports ``rich`` when it is installed (the CEL package depends on it) for console
    tracebacks the sidecar's JSON log never renders: 0.1-0.2 s of every start (issue 16). structlog
    is imported first with ``rich`` hidden, so it falls back to plain tracebacks; ``rich`` itself
    stays importable for whoever needs it."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError, as if absent
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()
