"""Attendee keys: their format, how they are found (by hash) and where callers put them.

Two kinds: `aip-` keys the proxy issues (looked up by their hash), and, for events with a shared
code, the seed's `{event_id}@{shared_code}/{email}`, which needs no registration step.
"""

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


def code_key_parts(key: str) -> tuple[str, str, str] | None:
    """(event id, shared code, email) of a `{event_id}@{shared_code}/{email}` key, else None.

    Event ids hold no '@' and emails no '/', so a code may hold either.
    """
    event_id, at, rest = key.partition("@")
    code, slash, email = rest.rpartition("/")
    if not (at and slash and event_id and code and email) or len(key) > 500:
        return None
    return event_id, code, email.strip().lower()


def hash_key(key: str) -> str:
    """The lookup id of a key; keys are random, so a plain SHA-256 cannot be reversed."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Compare a secret (key, shared code) in constant time, so timing tells nothing about it."""
    return hmac.compare_digest(given.encode(), expected.encode())


same_key = same_secret


def key_from_headers(api_key: str | None, authorization: str | None) -> str | None:
    """The key from `api-key` (AzureOpenAI client) or `Authorization: Bearer` (OpenAI client,
    and an Entra access token from AzureOpenAI's azure_ad_token_provider: shared.access.entra)."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
