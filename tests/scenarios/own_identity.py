"""The sidecar's own SVID as files on disk, issued by a dev CA the way a SPIFFE helper writes them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.spiffe import parse_spiffe_id

AGENT = "spiffe://example.org/agent/billing"


def issue(ca_dir: Path, out: Path, spiffe_id: str = AGENT) -> dict[str, Path]:
    ca = DevCA.load_or_create(ca_dir, "example.org")
    return write_svid(ca.issue_svid(parse_spiffe_id(spiffe_id), timedelta(hours=1)), out)
