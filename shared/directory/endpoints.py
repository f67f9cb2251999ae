"""Which upstream endpoints a resource may name: the one check, used when a resource is created
or changed and again before each call.

With `auth: managed_identity` the app's own identity token goes to the endpoint, and with either
kind of auth the proxy connects wherever it points. So an endpoint must be an https origin (plus
an optional path) on a host of an Azure AI service, where Microsoft answers and nobody else reads
the headers; the operator adds other hosts (an API Management gateway of their own, a sovereign
cloud) with AIPROXY_UPSTREAM_HOSTS. IP literals in any spelling, `localhost`, user-info and
ports other than 443 are refused: they are the ways to aim the proxy at itself, its platform's
metadata service or a private network. AIPROXY_ALLOW_LOOPBACK_UPSTREAMS lets a local run and the
tests use the simulator on 127.0.0.1 over http.

Names are not resolved: a private endpoint of an allowed service resolves to a private address
by design, and the hosts allowed are ones only Azure's DNS answers for.

Only the standard library and settings are needed: the command line imports the models.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from shared.platform.settings import Settings

# The data-plane hosts of Azure AI services in Azure's public cloud: Azure OpenAI, AI Services
# (and Foundry), and AI Search. API Management (.azure-api.net) is left out on purpose: anyone
# can create a gateway there whose policy copies the app's token elsewhere.
AZURE_AI_SUFFIXES = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
    ".search.windows.net",
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# What resolvers take as an IPv4 address besides dotted quads: 2130706433, 0177.1, 0x7f.0.0.1.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_PATH = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*$")

ENDPOINT_FIX = (
    "Send the resource's endpoint from the Azure portal (Keys and Endpoint): https:// and a host "
    "ending in " + ", ".join(AZURE_AI_SUFFIXES) + ", with no port, user name, query or fragment "
    "(a path is allowed). Other hosts are added by the app's operator (AIPROXY_UPSTREAM_HOSTS)."
)


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """The hosts an endpoint may name: (host or '.suffix', port) pairs, and whether loopback
    over http is allowed."""

    extra: tuple[tuple[str, int], ...] = ()
    allow_loopback: bool = False

    @classmethod
    def of(cls, settings: Settings) -> EndpointPolicy:
        return cls(parse_hosts(settings.upstream_hosts), settings.allow_loopback_upstreams)


@lru_cache(maxsize=16)
def parse_hosts(text: str) -> tuple[tuple[str, int], ...]:
    """AIPROXY_UPSTREAM_HOSTS: commas between exact hosts (`gw.contoso.com`) and suffixes
    (`.contoso.com`), each optionally with `:port` (443 otherwise); entries that are not host
    names (IP literals, `localhost`) are ignored, as they would be refused anyway."""
    found = []
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "443")
        name = host.removeprefix(".")
        if not port.isdigit() or not 0 < int(port) < 65536:
            continue
        if _HOST.match(name) is None or _ip_literal(name) or name == "localhost":
            continue
        found.append((host, int(port)))
    return tuple(found)


def _ip_literal(host: str) -> bool:
    """An address in any form a resolver takes as one, IPv6 (with IPv4 inside) included."""
    if ":" in host:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return len(labels) <= 4 and all(_NUMERIC_LABEL.match(label) for label in labels)


def _listed(host: str, port: int, policy: EndpointPolicy) -> bool:
    pairs = [(suffix, 443) for suffix in AZURE_AI_SUFFIXES] + list(policy.extra)
    for entry, allowed_port in pairs:
        if allowed_port != port:
            continue
        if entry.startswith("."):
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif host == entry:
            return True
    return False


def webhook_problem(url: str, policy: EndpointPolicy) -> str | None:
    """Why the proxy must not POST an organiser's alerts to `url`, or None: an https URL on a
    public host name (any host: it receives only the alert and its signature), never an IP
    literal or localhost, except loopback where the operator allows it (local runs, tests)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "is not a valid URL"
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https URL such as https://hooks.example.com/aiproxy"
    if "@" in parts.netloc:
        return "must not carry a user name or password ('user@' before the host)"
    if parts.fragment or url.endswith("#"):
        return "must not carry a fragment"
    if host in LOOPBACK_HOSTS and policy.allow_loopback:
        return None
    if host in LOOPBACK_HOSTS or _ip_literal(host) or host.endswith((".localhost", ".internal")):
        return "must name a public host, not an IP address or localhost"
    if _HOST.match(host) is None or "." not in host:
        return "must name a public host of letters, digits, '-' and '.'"
    if parts.scheme != "https":
        return "must be https"
    return None


@lru_cache(maxsize=4096)
def endpoint_problem(endpoint: str, policy: EndpointPolicy) -> str | None:
    """Why the proxy must not call `endpoint` (as stored: no trailing '/'), or None.

    The verdict is cached per endpoint string: it is asked before every upstream call."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https URL such as https://NAME.openai.azure.com"
    if "@" in parts.netloc:
        return "must not carry a user name or password ('user@' before the host)"
    if parts.query or parts.fragment or endpoint.endswith(("?", "#")):
        return "must not carry a query or fragment"
    if _PATH.match(parts.path) is None or any(s in (".", "..") for s in parts.path.split("/")):
        return "may have a plain path only (letters, digits and '._~-' between slashes)"
    loopback = host in LOOPBACK_HOSTS
    if loopback and policy.allow_loopback:
        return None  # the simulator of a local run or of the tests, on any port, http or https
    if loopback or _ip_literal(host):
        return "must name a host, not an IP address or localhost"
    if _HOST.match(host) is None:
        return "must name a host of letters, digits, '-' and '.'"
    if parts.scheme != "https":
        return "must be https"
    if not _listed(host, 443 if port is None else port, policy):
        if port not in (None, 443):
            return f"names port {port}, which is not allowed for this host"
        return "is not on an Azure AI service host this proxy may call"
    return None
