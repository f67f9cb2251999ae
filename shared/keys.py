"""Attendee keys: their format, how they are found (by hash) and where callers put them."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

KEY_PREFIX = "aip-"
_ALPHABET = string.ascii_letters + string.digits
_RANDOM_LENGTH = 32  # 32 characters of base62: about 190 bits of randomness
_KEY_PATTERN = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9]{{{_RANDOM_LENGTH}}}$")


def new_key() -> str:
    """A fresh attendee key: recognisable prefix plus enough randomness to never collide."""
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH))


def is_well_formed(key: str) -> bool:
    return _KEY_PATTERN.match(key) is not None


def hash_key(key: str) -> str:
    """The lookup id of a key; keys are random, so a plain SHA-256 cannot be reversed."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Compare a secret (key, shared code) in constant time, so timing tells nothing about it."""
    return hmac.compare_digest(given.encode(), expected.encode())


same_key = same_secret


def key_from_headers(api_key: str | None, authorization: str | None) -> str | None:
    """The key from `api-key` (AzureOpenAI client) or `Authorization: Bearer` (OpenAI client)."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
