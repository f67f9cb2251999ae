"""Who is managing: the operator, an organiser, or nobody, from a management call's credentials.

The app is the gate of manage/* (the host lets every call through): a host function key grants
nothing here. In order, the first credential present decides, and a wrong one is refused,
never passed over for the next:

1. `x-aiproxy-operator-key`: the operator, when it is AIPROXY_OPERATOR_KEY (constant time).
2. `Authorization: Bearer <JWT>` (when organiser tokens are configured): an Entra access token,
   verified; an operator app role or group makes the operator, an organiser one an organiser.
3. The EasyAuth principal (when AIPROXY_TRUST_EASYAUTH): the operator when its claims carry an
   operator app role or group; an organiser when they carry an organiser one, or when no
   organiser role or group is named at all; else 403.
4. Nothing of these: 401 `unauthorized`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.access.entra import EntraVerifier, Identity, guid_list
from shared.access.guard import FailedKeyGuard
from shared.access.principal import Principal, principal
from shared.errors import ProxyError
from shared.platform.settings import Settings

OPERATOR_KEY_HEADER = "x-aiproxy-operator-key"


# A sign-in is a cookie the browser sends along by itself, so a change made with one must come
# from the console's own page: a form or script on another site could send it too (CSRF).
# Keys and tokens travel in headers another site cannot set without a CORS preflight.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def refuse_cross_site(headers: Mapping[str, str]) -> None:
    """403 for a change that a browser says came from another site: `Sec-Fetch-Site` (every
    current browser sends it), else an `Origin` whose host is not the one called."""
    site = (headers.get("sec-fetch-site") or "").strip().lower()
    if site:
        if site in ("same-origin", "none"):
            return
        raise _cross_site(f"Sec-Fetch-Site: {site[:32]}")
    origin = (headers.get("origin") or "").strip()
    if not origin:
        return  # not from a page: browsers send Origin with every cross-site change
    host = (headers.get("x-forwarded-host") or headers.get("host") or "").split(",")[0].strip()
    if urlsplit(origin).netloc.lower() != host.lower():
        raise _cross_site(f"Origin {origin[:100]}")


def _cross_site(evidence: str) -> ProxyError:
    return ProxyError(
        "forbidden",
        f"A signed-in change must come from the console's own page; this one came from another "
        f"site ({evidence}). Use the console, or the CLI with a token.",
    )


@dataclass(frozen=True)
class Caller:
    """Who is managing: the operator sees and may do everything; an organiser, its own things.

    `owner` is what the caller's creations are owned by: '' for the operator. `tenants` are the
    Entra tenants the caller signed in from, the ones an organiser may let into its events.
    """

    owner: str = ""
    operator: bool = False
    tenants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # An organiser without an owner id would own what the operator owns.
        if not self.operator and not self.owner:
            raise ValueError("an organiser needs an owner id")

    @classmethod
    def the_operator(cls, tenants: frozenset[str] = frozenset()) -> Caller:
        return cls(owner="", operator=True, tenants=tenants)

    def may_see(self, owner: str) -> bool:
        return self.operator or owner == self.owner

    def may_name_tenant(self, tenant: str) -> bool:
        return self.operator or tenant in self.tenants


@dataclass(frozen=True)
class _Roles:
    """App roles (names) and groups (object ids) that give a role."""

    roles: frozenset[str]
    groups: frozenset[str]

    @property
    def named(self) -> bool:
        return bool(self.roles or self.groups)

    def held_by(self, roles: Collection[str], groups: Collection[str]) -> bool:
        return not self.roles.isdisjoint(roles) or not self.groups.isdisjoint(groups)

    def described(self) -> str:
        named = [f"group {g}" for g in sorted(self.groups)]
        named += [f"app role '{r}'" for r in sorted(self.roles)]
        return " or ".join(named)


class Callers:
    """Resolves the caller of a management call (see the module's docstring for the order)."""

    def __init__(self, settings: Settings, entra: EntraVerifier, guard: FailedKeyGuard) -> None:
        self.settings = settings
        self.entra = entra
        self.guard = guard
        # Compared as digests: equal lengths, so the comparison's time says nothing either.
        self._operator_key = (
            hashlib.sha256(settings.operator_key.encode()).digest()
            if settings.operator_key
            else b""
        )
        self.operators = _Roles(
            frozenset(settings.entra_operator_roles), guid_list(settings.entra_operator_groups)
        )
        self.organisers = _Roles(
            frozenset(settings.entra_organizer_roles), guid_list(settings.entra_organizer_groups)
        )

    async def caller(self, headers: Mapping[str, str], client: str, method: str = "GET") -> Caller:
        """The caller these headers prove, or the ProxyError (401, 403, 429) refusing it."""
        supplied = (headers.get(OPERATOR_KEY_HEADER) or "").strip()
        if supplied:
            return self._by_operator_key(supplied, client)
        scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
        bearer = scheme.lower() == "bearer" and bool(token.strip())
        if bearer and self.entra.organizer_tenants:
            return self._by_token(await self.entra.management_identity(token.strip()))
        found = principal(headers, self.settings)
        if found is not None:
            if method.upper() not in SAFE_METHODS:
                refuse_cross_site(headers)
            return self._by_principal(found)
        raise self._nobody(bearer)

    def _by_operator_key(self, supplied: str, client: str) -> Caller:
        digest = hashlib.sha256(supplied.encode()).digest()
        if self._operator_key and hmac.compare_digest(digest, self._operator_key):
            return Caller.the_operator()  # the right key always passes, whatever else came
        self.guard.failed(client)
        self.guard.check_lookup(client)  # 429 once this client keeps sending wrong keys
        if not self._operator_key:
            raise ProxyError(
                "unauthorized",
                f"This app has no operator key, so '{OPERATOR_KEY_HEADER}' opens nothing: "
                "the operator sets the app setting AIPROXY_OPERATOR_KEY. Organisers sign in "
                "instead.",
            )
        raise ProxyError(
            "unauthorized",
            f"The operator key in '{OPERATOR_KEY_HEADER}' is wrong. Copy it again from the "
            "app setting AIPROXY_OPERATOR_KEY (its Key Vault secret on Azure); organisers sign "
            "in instead.",
        )

    def _by_token(self, identity: Identity) -> Caller:
        tenants = frozenset({identity.tenant})
        if self.operators.held_by(identity.roles, identity.groups):
            return Caller.the_operator(tenants)
        if self.organisers.held_by(identity.roles, identity.groups):
            return Caller(owner=identity.owner, tenants=tenants)
        needed = self.organisers.described() or "a group or app role the app does not name yet"
        raise ProxyError(
            "forbidden",
            f"{identity.name} (object id {identity.object_id}) is not an organiser: that takes "
            f"{needed}. Ask an administrator to add you.",
        )

    def _by_principal(self, found: Principal) -> Caller:
        tenants = frozenset({found.tenant}) if found.tenant else frozenset()
        if self.operators.held_by(found.roles, found.groups):
            return Caller.the_operator(tenants)
        # Once organiser roles or groups are named, a sign-in needs one, as a token does;
        # with none named, whoever App Service lets sign in is an organiser.
        if self.organisers.named and not self.organisers.held_by(found.roles, found.groups):
            raise ProxyError(
                "forbidden",
                f"{found.name or found.id} is signed in but is not an organiser: that takes "
                f"{self.organisers.described()}. Ask an administrator to add you.",
            )
        return Caller(owner=found.owner, tenants=tenants)

    def _nobody(self, bearer: bool) -> ProxyError:
        ways = []
        if self.entra.organizer_tenants:
            audience = min(self.entra.organizer_audiences, default="the app's registration")
            ways.append(f"an Entra access token for {audience} as 'Authorization: Bearer <token>'")
        if self.settings.trust_easyauth:
            ways.append("the console's sign-in")
        if self._operator_key:
            ways.append(f"the operator key in the '{OPERATOR_KEY_HEADER}' header")
        if not ways:
            return ProxyError(
                "unauthorized",
                "Nobody can manage this app yet: it has no operator key and no organiser "
                "sign-in. Set the app setting AIPROXY_OPERATOR_KEY to a long random secret and "
                f"send it in the '{OPERATOR_KEY_HEADER}' header. A function key grants nothing "
                "here.",
            )
        ignored = (
            " This app takes no organiser tokens (AIPROXY_ENTRA_ORGANIZER_TENANTS is not set), "
            "so the bearer token was not looked at."
            if bearer
            else ""
        )
        return ProxyError(
            "unauthorized",
            f"Say who you are: send {' or '.join(ways)}. A function key grants nothing "
            f"here.{ignored}",
        )
