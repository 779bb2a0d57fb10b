"""The admin key: from BLOCKZOO_ADMIN_KEY, or generated once at first start and printed then only.

Only its sha256 is kept on disk, so the key cannot be read back later; losing it means setting
BLOCKZOO_ADMIN_KEY (or deleting the digest file to generate a new one).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from router.auth import admin_key_digest

DIGEST_FILE = "admin_key.sha256"


def resolve_admin_key(configured: str | None, data_dir: Path) -> tuple[bytes, str | None]:
    """(digest to check against, the new plaintext key if one was just generated)."""
    if configured:
        return admin_key_digest(configured), None
    path = data_dir / DIGEST_FILE
    if path.is_file():
        return bytes.fromhex(path.read_text().strip()), None
    key = "bz-admin-" + secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(admin_key_digest(key).hex())
    os.replace(tmp, path)
    return admin_key_digest(key), key
