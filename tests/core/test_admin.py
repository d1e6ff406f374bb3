"""The admin listener's own credential: the token file every admin call is checked against."""

from __future__ import annotations

import os

from sidecar.admin import ensure_token


def test_an_existing_admin_token_file_readable_by_others_is_refused(tmp_path):
    """ensure_token makes a new file 0600 and must not accept an existing token file that is group or world
    readable (for example a ConfigMap or a shared volume) as it is (security review 2, finding G7)."""
    path = tmp_path / "admin-token"
    path.write_text("t" * 43 + "\n")
    os.chmod(path, 0o644)
    try:
        ensure_token(path)
    except (ValueError, PermissionError):
        return
    assert path.stat().st_mode & 0o077 == 0
