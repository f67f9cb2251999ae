"""Entra ID access tokens, verified by the app itself: signature, issuer, audience and time.

Callers that use `DefaultAzureCredential` send `Authorization: Bearer <JWT>`, a token for
Azure OpenAI; organisers may send one for the app's own registration. Nothing here trusts a
header the platform may or may not have set: the signature is checked against the keys the
token's tenant publishes (OpenID discovery, then its JWKS), fetched over one pooled client,
kept for hours, and fetched again when a token names a key id not seen yet, at most once per
`entra_key_refetch_seconds` and tenant, so made-up key ids cannot make the app hammer Entra.
A token that passed is remembered by its hash until it expires: the request path checks RS256
once per token, not once per call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
import orjson

from shared.access.principal import Principal
from shared.directory.events import Event
from shared.directory.validation import is_guid
from shared.errors import BadRequest, Unavailable, WrongCredential
from shared.platform import clock
from shared.platform.settings import Settings

log = logging.getLogger(__name__)

# What the Azure identity libraries ask for when a client calls Azure OpenAI
# (scope https://cognitiveservices.azure.com/.default).
ATTENDEE_AUDIENCE = "https://cognitiveservices.azure.com"
# The header naming the event a token is for, when more than one event takes its tenant.
EVENT_HEADER = "x-aiproxy-event"
V1_ISSUER = "https://sts.windows.net/{tenant}/"
KEYS_TTL_SECONDS = 6 * 3600
CLOCK_SKEW_SECONDS = 60
_VERIFIED_LIMIT = 50_000

_JWT = re.compile(r"^[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+$")
# Claims naming a person or an app, in order of preference.
_NAME_CLAIMS = ("preferred_username", "upn", "unique_name", "email", "name", "app_displayname")
_WWW_AUTHENTICATE_TEXT = re.compile(r"[^ !#-\[\]-~]")  # RFC 6750: no '"', '\', non-ASCII


def looks_like_jwt(value: str) -> bool:
    """Three base64url segments: never an `aip-` key nor an `{event}@{code}/{email}` key."""
    return len(value) < 16_384 and _JWT.match(value) is not None


def guid_list(ids: Iterable[str]) -> frozenset[str]:
    """Tenant or object ids of a setting, lower-cased."""
    return frozenset(part.lower() for part in ids)


def refused(message: str) -> WrongCredential:
    """401 invalid_token, with the challenge RFC 6750 asks for."""
    description = _WWW_AUTHENTICATE_TEXT.sub("?", message)[:300]
    challenge = f'Bearer error="invalid_token", error_description="{description}"'
    return WrongCredential("invalid_token", message, headers={"WWW-Authenticate": challenge})


def unavailable() -> Unavailable:
    return Unavailable(
        "entra_unavailable",
        "The proxy cannot fetch the signing keys of your tenant from Entra ID right now, so "
        "it cannot check your token. Retry in a minute, or use your event key.",
        retry_after=30,
    )


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class Identity(Principal):
    """The caller a verified token names: the principal an Entra sign-in of the same user gives
    (provider 'aad', its object id), so its owner id and attendee name are that sign-in's."""

    audience: str
    expires_at: float  # seconds since the epoch

    @property
    def object_id(self) -> str:
        return self.id

    def allowed_by(self, allowed: Collection[str]) -> bool:
        """In an event's allow list: by its own object id or one of its groups' (none: all)."""
        return not allowed or self.object_id in allowed or not self.groups.isdisjoint(allowed)


def token_tenant(token: str) -> str:
    """The tenant a token claims to come from, before anything about it is verified."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, orjson.JSONDecodeError):
        raise malformed() from None
    tenant = claims.get("tid") if isinstance(claims, dict) else None
    if not isinstance(tenant, str) or not is_guid(tenant.lower()):
        raise refused(
            "The token names no Entra tenant (claim 'tid'). Send an Entra ID access token for "
            f"{ATTENDEE_AUDIENCE}, or your event key."
        )
    return tenant.lower()


def malformed() -> WrongCredential:
    return refused(
        "The bearer token is not a well-formed JWT. Send an Entra ID access token "
        "(scope https://cognitiveservices.azure.com/.default) or your event key."
    )


def _audiences(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v.rstrip("/") for v in values if isinstance(v, str)]


def _strings(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(v.lower() if is_guid(v.lower()) else v for v in value if isinstance(v, str))


def identity_of(claims: Mapping[str, Any], tenant: str) -> Identity:
    object_id = claims.get("oid")
    if not isinstance(object_id, str) or not object_id:
        raise refused("The token names no object id (claim 'oid'): it is not an access token.")
    name = next(
        (claims[c] for c in _NAME_CLAIMS if claims.get(c) and isinstance(claims[c], str)), ""
    )
    return Identity(
        provider="aad",
        id=object_id.lower(),
        tenant=tenant,
        name=(name or object_id).strip()[:200],
        audience=(_audiences(claims.get("aud")) or [""])[0],
        expires_at=float(claims["exp"]),
        groups=_strings(claims.get("groups")),
        roles=_strings(claims.get("roles")),
    )


def choose_event(events: list[Event], tenant: str, now: datetime) -> Event:
    """Which of the events taking a tenant a token without the event header is for: the one
    running now; when none is, the nearest in time (so the answer says when it runs)."""
    live = [e for e in events if e.active and e.window_utc()[0] <= now < e.window_utc()[1]]
    if len(live) == 1:
        return live[0]
    if live:
        named = ", ".join(f"'{e.name}' ({e.id})" for e in live[:5])
        raise BadRequest(
            "invalid_request",
            f"Tokens of tenant {tenant} are taken by {len(live)} events running now: {named}. "
            f"Name yours in the '{EVENT_HEADER}' header, for example AzureOpenAI(..., "
            f"default_headers={{'{EVENT_HEADER}': '{live[0].id}'}}).",
            param=EVENT_HEADER,
        )

    def distance(event: Event) -> tuple[bool, float]:
        start, end = event.window_utc()
        seconds = (start - now) if now < start else (now - end)
        return not event.active, seconds.total_seconds()

    return min(events, key=distance)


@dataclass
class _TenantKeys:
    """One tenant's published signing keys and when they were last asked for."""

    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    issuer: str = ""  # as the tenant's OpenID configuration names it
    fetched_at: float = float("-inf")  # monotonic
    attempted_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SigningKeys:
    """Each tenant's signing keys from its OpenID configuration, cached for hours."""

    def __init__(self, authority: str, refetch_seconds: float) -> None:
        self.authority = authority.rstrip("/")
        self.refetch_seconds = refetch_seconds
        self._tenants: dict[str, _TenantKeys] = {}
        self._session: aiohttp.ClientSession | None = None

    def issuers(self, tenant: str) -> set[str]:
        """The issuers a token of this tenant may name: Entra's v1 and v2 forms."""
        found = {V1_ISSUER.format(tenant=tenant), f"{self.authority}/{tenant}/v2.0"}
        entry = self._tenants.get(tenant)
        if entry is not None and entry.issuer:
            found.add(entry.issuer)
        return found

    async def key(self, tenant: str, kid: str) -> jwt.PyJWK:
        """The tenant's key of this id; fetched again when missing, floor permitting."""
        entry = self._tenants.get(tenant)
        if entry is None:
            entry = self._tenants[tenant] = _TenantKeys()
        if kid not in entry.keys or time.monotonic() - entry.fetched_at > KEYS_TTL_SECONDS:
            async with entry.lock:  # one fetch at a time per tenant; the others wait for it
                wanted = kid not in entry.keys
                old = time.monotonic() - entry.fetched_at > KEYS_TTL_SECONDS
                floor_passed = time.monotonic() - entry.attempted_at >= self.refetch_seconds
                if (wanted or old) and floor_passed:
                    await self._fetch(tenant, entry)
        found = entry.keys.get(kid)
        if found is not None:
            return found
        if not entry.keys:
            raise unavailable()
        raise refused(
            f"The token is signed with a key (id '{kid[:64]}') that tenant {tenant} does not "
            "publish. Get a new token; if it keeps happening, the token is not from Entra ID."
        )

    async def _fetch(self, tenant: str, entry: _TenantKeys) -> None:
        entry.attempted_at = time.monotonic()
        discovery = f"{self.authority}/{tenant}/v2.0/.well-known/openid-configuration"
        try:
            configuration = await self._get_json(discovery)
            jwks = await self._get_json(str(configuration["jwks_uri"]))
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError) as exc:
            log.warning("signing keys of tenant %s not fetched: %r", tenant, exc)
            return  # the keys held so far, however old, stay
        published = jwks.get("keys") if isinstance(jwks, dict) else None
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in published if isinstance(published, list) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not jwk.get("kid"):
                continue
            if jwk.get("use", "sig") != "sig":
                continue
            try:
                keys[str(jwk["kid"])] = jwt.PyJWK(jwk, algorithm="RS256")
            except jwt.PyJWTError:
                continue
        if not keys:
            log.warning("tenant %s publishes no RSA signing key", tenant)
            return
        issuer = configuration.get("issuer")
        entry.issuer = issuer.replace("{tenantid}", tenant) if isinstance(issuer, str) else ""
        entry.keys, entry.fetched_at = keys, time.monotonic()

    async def _get_json(self, url: str) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=10, connect=5),
                skip_auto_headers=("User-Agent",),
            )
        async with self._session.get(url, allow_redirects=False) as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class EntraVerifier:
    """Checks Entra access tokens for the proxy (attendees) and management (organisers)."""

    def __init__(self, settings: Settings) -> None:
        self.keys = SigningKeys(settings.entra_authority, settings.entra_key_refetch_seconds)
        self.organizer_tenants = guid_list(settings.entra_organizer_tenants)
        self.organizer_audiences = frozenset(
            audience.rstrip("/") for audience in settings.entra_organizer_audience
        )
        self._verified: dict[str, Identity] = {}  # by the token's hash, until it expires

    def cached(self, token: str) -> Identity | None:
        """A token that passed every check before and has not expired since."""
        found = self._verified.get(_digest(token))
        if found is None or found.expires_at + CLOCK_SKEW_SECONDS <= clock.now().timestamp():
            return None
        return found

    async def verify(self, token: str, tenant: str, audiences: Collection[str]) -> Identity:
        """The token's identity once its signature, issuer, audience and times hold."""
        identity = self.cached(token)
        fresh = identity is None
        if identity is None:
            identity = await self._verify(token, tenant)
        if identity.audience not in audiences:
            wanted = " or ".join(sorted(audiences))
            raise refused(
                f"The token is for '{identity.audience[:100]}', not for {wanted}. "
                f"Request it for the scope {sorted(audiences)[0]}/.default."
            )
        if fresh:
            self._remember(token, identity)
        return identity

    async def _verify(self, token: str, tenant: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise malformed() from None
        if header.get("alg") != "RS256":
            raise refused(
                f"The token is signed with '{str(header.get('alg'))[:16]}'; Entra ID access "
                "tokens are signed with RS256. Send one from your Azure credential."
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise refused("The token names no signing key (header 'kid').")
        key = await self.keys.key(tenant, kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                options={
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise refused(
                f"The token's signature does not match tenant {tenant}'s published key "
                f"'{kid[:64]}'. Get a new token from your Azure credential."
            ) from None
        except jwt.PyJWTError:
            raise malformed() from None
        issuer = claims.get("iss")
        if issuer not in self.keys.issuers(tenant):
            raise refused(
                f"The token's issuer '{str(issuer)[:100]}' is not tenant {tenant}. "
                "Send a token Entra ID issued for your tenant."
            )
        expires = claims.get("exp")
        if not isinstance(expires, int | float):
            raise refused("The token has no expiry (claim 'exp').")
        now = clock.now().timestamp()
        if now >= expires + CLOCK_SKEW_SECONDS:
            raise refused(
                f"The token expired at {_utc(expires)}. Get a new one: the SDK's "
                "azure_ad_token_provider does so before each expiry."
            )
        not_before = claims.get("nbf")
        if isinstance(not_before, int | float) and now + CLOCK_SKEW_SECONDS < not_before:
            raise refused(
                f"The token is not valid before {_utc(not_before)}. Check this computer's clock."
            )
        return identity_of(claims, tenant)

    def _remember(self, token: str, identity: Identity) -> None:
        if len(self._verified) >= _VERIFIED_LIMIT:
            now = clock.now().timestamp()
            for digest in [d for d, i in self._verified.items() if i.expires_at < now]:
                del self._verified[digest]
            if len(self._verified) >= _VERIFIED_LIMIT:
                for digest in list(self._verified)[: _VERIFIED_LIMIT // 10]:
                    del self._verified[digest]
        self._verified[_digest(token)] = identity

    async def management_identity(self, token: str) -> Identity:
        """Who an organiser's or operator's token names, once verified: a token of an
        organisers' tenant for the app's own audience. What it may do is shared.access.callers'
        business; an invalid token is refused here, never passed on."""
        if not looks_like_jwt(token):
            raise malformed()
        tenant = token_tenant(token)
        if tenant not in self.organizer_tenants:
            raise refused(
                f"Tokens of tenant {tenant} are not accepted for management. Sign in with an "
                "account of the organisers' tenant."
            )
        if not self.organizer_audiences:
            raise refused(
                "This app takes no organiser tokens yet: AIPROXY_ENTRA_ORGANIZER_AUDIENCE is "
                "not set. Use the operator key."
            )
        return await self.verify(token, tenant, self.organizer_audiences)

    async def close(self) -> None:
        await self.keys.close()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
