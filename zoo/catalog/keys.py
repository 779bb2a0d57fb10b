"""API keys: generation, the stored hash and prefix, and constant-time comparison.

A key is `bz-` plus 43 URL-safe characters from `secrets.token_urlsafe(32)`: 256 bits from the OS's
CSPRNG. Only its SHA-256 and its first `PREFIX_LEN` characters are stored. A plain, fast hash is the
right tool here: slow salted KDFs (bcrypt, argon2) protect low-entropy passwords from guessing, but no
one can enumerate 2^256 keys, so a leaked table of SHA-256 digests reveals nothing usable, and
authenticating a request costs microseconds rather than a deliberate 100 ms. Identical keys never
occur, so a salt would add nothing either.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_SCHEME = "bz-"
KEY_RANDOM_BYTES = 32
# The prefix shown in listings and used to find candidate rows: the scheme plus 9 random characters
# (54 bits), which leaves over 200 secret bits and makes two keys sharing a prefix very unlikely.
PREFIX_LEN = len(KEY_SCHEME) + 9
_KEY_RE = re.compile(r"^bz-[A-Za-z0-9_-]{43}$")


def generate_key() -> str:
    """A new random API key in plaintext; show it once, store only `hash_key` and `key_prefix` of it."""
    return KEY_SCHEME + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def is_well_formed(key: str) -> bool:
    """Whether `key` has the shape of a BlockZoo key (it may still be unknown or revoked)."""
    return _KEY_RE.fullmatch(key) is not None


def key_prefix(key: str) -> str:
    """The non-secret leading part of `key`, stored in clear for display and lookup."""
    return key[:PREFIX_LEN]


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`, which is what the catalog stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def matches(key: str, stored_hash: str) -> bool:
    """Whether `key` hashes to `stored_hash`, compared in constant time so timing leaks no digest bytes."""
    return hmac.compare_digest(hash_key(key).encode("ascii"), stored_hash.encode("ascii"))
