"""The signed-in caller from App Service authentication (EasyAuth), when the app trusts it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from shared.platform.settings import Settings

# Claims that carry a stable user id, in order of preference (Entra object id first).
_ID_CLAIMS = (
    "http://schemas.microsoft.com/identity/claims/objectidentifier",
    "oid",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
    "sub",
)
# Claims of App Service's principal that carry app roles, groups and the Entra tenant.
_ROLE_CLAIMS = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")
_GROUP_CLAIMS = ("groups",)
_TENANT_CLAIMS = ("http://schemas.microsoft.com/identity/claims/tenantid", "tid")
_NAME_CLAIMS = (
    "preferred_username",
    "name",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
    "emails",
)


@dataclass(frozen=True)
class Principal:
    """A signed-in user: its provider ('aad', 'github', …), stable id and display name."""

    provider: str
    id: str
    name: str
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()  # object ids, lower-cased
    tenant: str = ""  # the Entra tenant, lower-cased; "" for other providers

    @property
    def owner(self) -> str:
        """The owner id of what this user creates; the id, because names can change."""
        return f"{self.provider}:{self.id}"

    @property
    def user(self) -> str:
        """The attendee name of this user when it registers for an event."""
        return f"{self.provider}:{self.name or self.id}"


def _decode(encoded: str) -> dict[str, Any] | None:
    try:
        padded = encoded.strip() + "=" * (-len(encoded.strip()) % 4)
        decoded = orjson.loads(base64.b64decode(padded, validate=False))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    return decoded if isinstance(decoded, dict) else None


def _claims(decoded: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for claim in decoded.get("claims") or []:
        if isinstance(claim, dict) and isinstance(claim.get("typ"), str):
            found.setdefault(claim["typ"], str(claim.get("val", "")))
    return found


def _claim_values(decoded: dict[str, Any], types: tuple[str, ...]) -> frozenset[str]:
    """Every value of these claim types: roles and groups come one claim per value."""
    wanted = set(types)
    role_type = decoded.get("role_typ")
    if "roles" in wanted and isinstance(role_type, str):
        wanted.add(role_type)
    return frozenset(
        str(claim.get("val", "")).strip()
        for claim in decoded.get("claims") or []
        if isinstance(claim, dict) and claim.get("typ") in wanted and claim.get("val")
    )


def principal(headers: Mapping[str, str], settings: Settings) -> Principal | None:
    """The caller signed in through EasyAuth, only when AIPROXY_TRUST_EASYAUTH is on.

    App Service strips these headers from outside requests and sets them itself; without
    EasyAuth in front, anybody could forge them, hence the setting. Reads both the App Service
    shape ({auth_typ, claims, name_typ}) and the Static Web Apps shape ({identityProvider,
    userId, userDetails}); the X-MS-CLIENT-PRINCIPAL-ID/-NAME/-IDP headers take precedence.
    """
    if not settings.trust_easyauth:
        return None
    encoded = headers.get("x-ms-client-principal")
    if not encoded:
        return None
    decoded = _decode(encoded)
    if decoded is None:
        return None
    claims = _claims(decoded)
    principal_id = (
        headers.get("x-ms-client-principal-id")
        or str(decoded.get("userId") or "")
        or next((claims[c] for c in _ID_CLAIMS if claims.get(c)), "")
    )
    provider = (
        headers.get("x-ms-client-principal-idp")
        or str(decoded.get("auth_typ") or decoded.get("identityProvider") or "")
        or "aad"
    )
    name_claim = decoded.get("name_typ")
    name = (
        headers.get("x-ms-client-principal-name")
        or str(decoded.get("userDetails") or "")
        or (claims.get(name_claim, "") if isinstance(name_claim, str) else "")
        or next((claims[c] for c in _NAME_CLAIMS if claims.get(c)), "")
    )
    principal_id, provider, name = principal_id.strip(), provider.strip().lower(), name.strip()
    if not principal_id:
        return None
    # Only Entra's principals name a tenant; another provider's claim of one means nothing.
    tenant = (
        next((claims[c] for c in _TENANT_CLAIMS if claims.get(c)), "") if provider == "aad" else ""
    )
    return Principal(
        provider=provider[:32],
        id=principal_id[:128],
        name=name[:200],
        roles=_claim_values(decoded, _ROLE_CLAIMS),
        groups=frozenset(g.lower() for g in _claim_values(decoded, _GROUP_CLAIMS)),
        tenant=tenant.strip().lower()[:64],
    )
