"""Affinity: which pool member holds a stored response, sealed into what the proxy hands out.

A stored response (and the reasoning an upstream encrypted for it) lives only on the Azure
OpenAI resource that produced it. The proxy never stores where: it seals the member's resource
id and the attendee's id into every response id it hands out, and into a tag in front of every
`encrypted_content`, with AES-GCM-SIV under a key derived from AIPROXY_ENCRYPTION_KEY. Any
instance opens them again without storage, from the first millisecond; nobody else can make or
read them. Sealing is deterministic (a fixed nonce, which GCM-SIV allows at the cost of showing
that two ids are equal): the same upstream id always gives the same proxy id, so a response
fetched again has the id it was created with.

An MCP server's session id (`Mcp-Session-Id`) is sealed the same way, with the MCP resource and
the attendee: any instance sends the session's next message to the server that holds it, and
an id another attendee sends does not open (the proxy answers 404, as for an ended session).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

RESPONSE_PREFIX = "resp_"
CONTENT_PREFIX = "aip1."  # tag, then '.', then the upstream's encrypted_content
_VERSION = 1
_NONCE = bytes(12)  # fixed: deterministic sealing (see the module's docstring)
_ID_AAD = b"aiproxy response id"
_CONTENT_AAD = b"aiproxy encrypted content"
_SESSION_AAD = b"aiproxy mcp session"
SESSION_PREFIX = "aipmcp1."
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX_ID = re.compile(r"^resp_((?:[0-9a-f]{2})+)$")


@dataclass(frozen=True)
class Sealed:
    """What a proxy id or tag holds."""

    resource_id: str
    attendee_id: str
    upstream_id: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _upstream_response_id(sealed: bytes) -> str:
    """An upstream response id as `seal_id` packed it: 0 and its hex as bytes, or 1 and text."""
    kind, rest = sealed[0], sealed[1:]
    return RESPONSE_PREFIX + rest.hex() if kind == 0 else rest.decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pack_id(value: str) -> bytes:
    """A resource or attendee id: 16 hex characters as 8 bytes, anything else as text."""
    if _HEX16.match(value):
        return b"\x00" + bytes.fromhex(value)
    raw = value.encode()
    if len(raw) > 200:
        raise ValueError("id too long to seal")
    return bytes([len(raw)]) + raw


def _unpack_id(data: bytes, at: int) -> tuple[str, int]:
    size = data[at]
    if size == 0:
        return data[at + 1 : at + 9].hex(), at + 9
    return data[at + 1 : at + 1 + size].decode(), at + 1 + size


class AffinitySeal:
    """Seals and opens response ids and encrypted_content tags with the app's key."""

    def __init__(self, encryption_key: str) -> None:
        # A key of its own, derived from the app's, so ids never share a key with anything else.
        secret = hmac.new(encryption_key.encode(), b"aiproxy affinity v1", hashlib.sha256)
        self._aead = AESGCMSIV(secret.digest())

    def _seal(self, plain: bytes, aad: bytes) -> str:
        return _b64(self._aead.encrypt(_NONCE, bytes([_VERSION]) + plain, aad))

    def _open(self, sealed: str, aad: bytes) -> bytes | None:
        try:
            plain = self._aead.decrypt(_NONCE, _unb64(sealed), aad)
        except (InvalidTag, ValueError, binascii.Error):
            return None
        if not plain or plain[0] != _VERSION:
            return None
        return plain[1:]

    # --- response ids ----------------------------------------------------------------------

    def seal_id(self, upstream_id: str, resource_id: str, attendee_id: str) -> str:
        """The id the caller sees for an upstream response id."""
        head = _pack_id(resource_id) + _pack_id(attendee_id)
        hex_id = _HEX_ID.match(upstream_id)
        # Upstream ids are 'resp_' and hex, mostly: half the length as bytes.
        tail = b"\x00" + bytes.fromhex(hex_id[1]) if hex_id else b"\x01" + upstream_id.encode()
        return RESPONSE_PREFIX + self._seal(head + tail, _ID_AAD)

    def open_id(self, proxy_id: str) -> Sealed | None:
        """What a proxy response id holds; None for anything this app did not seal."""
        return self._open_ids(proxy_id, RESPONSE_PREFIX, 1000, _ID_AAD, _upstream_response_id)

    # --- MCP sessions ---------------------------------------------------------------------

    def seal_session(self, upstream_id: str, resource_id: str, attendee_id: str) -> str:
        """The Mcp-Session-Id the caller sees for an MCP server's session id."""
        plain = _pack_id(resource_id) + _pack_id(attendee_id) + upstream_id.encode()
        return SESSION_PREFIX + self._seal(plain, _SESSION_AAD)

    def open_session(self, proxy_id: str) -> Sealed | None:
        """What a sealed session id holds; None for anything this app did not seal."""
        return self._open_ids(proxy_id, SESSION_PREFIX, 2000, _SESSION_AAD, bytes.decode)

    def _open_ids(
        self,
        proxy_id: str,
        prefix: str,
        longest: int,
        aad: bytes,
        upstream_of: Callable[[bytes], str],
    ) -> Sealed | None:
        """The resource's and attendee's ids sealed after `prefix`, and the upstream's id
        (`upstream_of` what follows them); None for anything this app did not seal."""
        if not proxy_id.startswith(prefix) or len(proxy_id) > longest:
            return None
        plain = self._open(proxy_id[len(prefix) :], aad)
        if plain is None:
            return None
        try:
            resource_id, at = _unpack_id(plain, 0)
            attendee_id, at = _unpack_id(plain, at)
            upstream = upstream_of(plain[at:])
        except (IndexError, UnicodeDecodeError):
            return None
        return Sealed(resource_id, attendee_id, upstream)

    # --- encrypted reasoning ----------------------------------------------------------------

    def tag_content(self, content: str, resource_id: str, attendee_id: str) -> str:
        """encrypted_content as the caller sees it: our tag, then the upstream's."""
        tag = self._seal(_pack_id(resource_id) + _pack_id(attendee_id), _CONTENT_AAD)
        return f"{CONTENT_PREFIX}{tag}.{content}"

    def open_content(self, tagged: str) -> tuple[Sealed, str] | None:
        """(who, the upstream's encrypted_content) of a tagged one; None if not tagged by us."""
        if not tagged.startswith(CONTENT_PREFIX):
            return None
        tag, dot, content = tagged[len(CONTENT_PREFIX) :].partition(".")
        plain = self._open(tag, _CONTENT_AAD) if dot else None
        if plain is None:
            return None
        try:
            resource_id, at = _unpack_id(plain, 0)
            attendee_id, _ = _unpack_id(plain, at)
        except (IndexError, UnicodeDecodeError):
            return None
        return Sealed(resource_id, attendee_id), content
