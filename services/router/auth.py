"""API keys of the public router: several keys with ids, stored only as SHA-256 digests.

Keys are long random tokens (``mmedrag keys create``), so a plain SHA-256 digest is enough to store them
(no password stretching needed) and comparisons are constant-time. Keys come from
``MMEDRAG_ROUTER_API_KEYS`` (``id:sha256hex`` pairs, comma-separated) and/or the file named by
``MMEDRAG_ROUTER_API_KEYS_FILE`` (one ``id:sha256hex`` per line; ``#`` comments; a Kubernetes Secret
mounted as a file). Requests send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from services.common.errors import ServiceError

KEY_PREFIX = "mmr_"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Unauthorized(ServiceError):
    """401: no API key, or one we do not know."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (shown once; only its digest is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    digest: str


def parse_entries(text: str, *, source: str) -> list[KeyEntry]:
    """``id:sha256hex`` entries separated by commas or new lines; clear errors naming the source."""
    entries = []
    for raw in re.split(r"[,\n]", text):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key_id, sep, digest = line.partition(":")
        digest = digest.strip().lower()
        if not sep or not key_id.strip() or not _DIGEST.match(digest):
            raise ValueError(f"{source}: expected 'id:sha256hex' (64 hex digits), got {line[:20]!r}…")
        entries.append(KeyEntry(key_id.strip(), digest))
    return entries


class APIKeyStore:
    """Looks up a presented key by its digest; knows nothing of the plain keys."""

    def __init__(self, entries: list[KeyEntry]):
        ids = [e.key_id for e in entries]
        duplicates = {i for i in ids if ids.count(i) > 1}
        if duplicates:
            raise ValueError(f"duplicate API key ids: {sorted(duplicates)}")
        self.entries = entries

    @classmethod
    def from_settings(cls, inline: str | None, file: Path | None) -> APIKeyStore:
        entries = parse_entries(inline or "", source="MMEDRAG_ROUTER_API_KEYS")
        if file is not None:
            if not file.is_file():
                raise ValueError(f"API keys file {file} not found (MMEDRAG_ROUTER_API_KEYS_FILE)")
            entries += parse_entries(file.read_text(encoding="utf-8"), source=str(file))
        return cls(entries)

    def identify(self, key: str) -> str | None:
        """The key id, or None; compares every digest in constant time."""
        presented = hash_key(key)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.key_id
        return found


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


async def require_api_key(request: Request) -> str:
    """Route dependency: the caller's key id (``anonymous`` when auth is off), or 401."""
    store: APIKeyStore | None = request.app.state.api_keys
    if store is None:
        request.state.key_id = "anonymous"
        return "anonymous"
    key = presented_key(request)
    if key is None:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            code="missing_api_key",
        )
    key_id = store.identify(key)
    if key_id is None:
        raise Unauthorized("invalid API key")
    request.state.key_id = key_id
    return key_id
