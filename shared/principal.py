"""The signed-in caller from App Service authentication (EasyAuth), when the app trusts it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from shared.settings import Settings


def principal(headers: Mapping[str, str], settings: Settings) -> dict[str, Any] | None:
    """The decoded X-MS-CLIENT-PRINCIPAL, only when AIPROXY_TRUST_EASYAUTH is on.

    App Service strips these headers from outside requests and sets them itself; without
    EasyAuth in front, anybody could forge them, hence the setting.
    """
    if not settings.trust_easyauth:
        return None
    encoded = headers.get("x-ms-client-principal")
    if not encoded:
        return None
    try:
        decoded = orjson.loads(base64.b64decode(encoded, validate=False))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(decoded, dict):
        return None
    principal_id = headers.get("x-ms-client-principal-id") or ""
    provider = decoded.get("auth_typ") or headers.get("x-ms-client-principal-idp") or ""
    name = headers.get("x-ms-client-principal-name") or ""
    for claim in decoded.get("claims") or []:
        if (
            isinstance(claim, dict)
            and not name
            and claim.get("typ") in ("name", "preferred_username")
        ):
            name = str(claim.get("val", ""))
    if not principal_id:
        return None
    return {"id": principal_id, "provider": str(provider), "name": name}


def owner_of(headers: Mapping[str, str], settings: Settings) -> str:
    """The owner id for management calls: '' (operator) unless a trusted principal is present."""
    found = principal(headers, settings)
    return f"{found['provider']}:{found['id']}" if found else ""
