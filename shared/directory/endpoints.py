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

MCP servers (model class `mcp`) live anywhere on the internet, so the allow-list of Azure hosts
does not fit them. Their rule (`mcp_endpoint_problem`): https on port 443 to a public host name,
never an IP literal, `localhost`, a single label (an intranet name) or a name under a suffix
reserved for private networks (.local, .internal, .lan, .home.arpa, .localhost, …); the
operator narrows it to a list of hosts with AIPROXY_MCP_HOSTS (same syntax as
AIPROXY_UPSTREAM_HOSTS, ports other than 443 allowed there). A public name can still resolve to
a private address: the client connects to MCP servers through a resolver that refuses every
address that is not globally routable (shared/upstreams/client.py), so the check holds for the
address actually used. Loopback is allowed over http only with AIPROXY_ALLOW_LOOPBACK_UPSTREAMS.
Alert webhooks (`webhook_problem`) follow the same rule (`public_url_problem`), with what differs
as its parameters: any port, any path and a query, and no operator's list.

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
    mcp_hosts: tuple[tuple[str, int], ...] = ()  # empty: any public host on 443

    @classmethod
    def of(cls, settings: Settings) -> EndpointPolicy:
        return cls(
            parse_hosts(settings.upstream_hosts),
            settings.allow_loopback_upstreams,
            parse_hosts(settings.mcp_hosts),
        )


@lru_cache(maxsize=16)
def parse_hosts(items: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """AIPROXY_UPSTREAM_HOSTS: exact hosts (`gw.contoso.com`) and suffixes (`.contoso.com`),
    each optionally with `:port` (443 otherwise); entries that are not host names (IP
    literals, `localhost`) are ignored, as they would be refused anyway."""
    found = []
    for item in (part.lower() for part in items):
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
    return _in(host, port, [(suffix, 443) for suffix in AZURE_AI_SUFFIXES] + list(policy.extra))


def _in(host: str, port: int, pairs: list[tuple[str, int]]) -> bool:
    for entry, allowed_port in pairs:
        if allowed_port != port:
            continue
        if entry.startswith("."):
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif host == entry:
            return True
    return False


@lru_cache(maxsize=4096)
def endpoint_problem(endpoint: str, policy: EndpointPolicy) -> str | None:
    """Why the proxy must not call `endpoint` (as stored: no trailing '/'), or None.

    The verdict is cached per endpoint string: it is asked before every upstream call."""
    found, parts = _shape_problem(endpoint, policy)
    if found is not None or parts is None:
        return found
    host, port = parts
    if not _listed(host, 443 if port is None else port, policy):
        if port not in (None, 443):
            return f"names port {port}, which is not allowed for this host"
        return "is not on an Azure AI service host this proxy may call"
    return None


# Suffixes of names that only private networks answer for (RFC 6761, 6762, 8375 and common use).
PRIVATE_SUFFIXES = (
    ".local", ".localhost", ".internal", ".intranet", ".lan", ".home", ".corp", ".private",
    ".home.arpa", ".localdomain", ".test", ".invalid", ".example", ".arpa",
)  # fmt: skip

MCP_ENDPOINT_FIX = (
    "Send the MCP server's streamable HTTP URL, e.g. https://mcp.example.com/mcp: https:// and "
    "a public host name, with no port, user name, query or fragment. Hosts on other ports are "
    "added by the app's operator (AIPROXY_MCP_HOSTS)."
)


@lru_cache(maxsize=4096)
def mcp_endpoint_problem(endpoint: str, policy: EndpointPolicy) -> str | None:
    """Why the proxy must not call the MCP server at `endpoint`, or None (the module's rule)."""
    return public_url_problem(
        endpoint, policy, "MCP servers", "https://mcp.example.com/mcp", plain=True,
        hosts=policy.mcp_hosts,
    )  # fmt: skip


def webhook_problem(url: str, policy: EndpointPolicy) -> str | None:
    """Why the proxy must not POST an organiser's alerts to `url`, or None. It receives only the
    alert and its signature: any port, and any path and query (a receiver's own token)."""
    return public_url_problem(
        url, policy, "alert webhooks", "https://hooks.example.com/aiproxy", plain=False,
        any_port=True,
    )  # fmt: skip


def public_url_problem(
    url: str,
    policy: EndpointPolicy,
    what: str,
    example: str,
    *,
    plain: bool,
    hosts: tuple[tuple[str, int], ...] = (),
    any_port: bool = False,
) -> str | None:
    """The one rule for URLs on any public host (what the proxy calls beyond Azure): https to a
    public host name, never an IP literal, `localhost`, a single label or a private suffix;
    loopback only where the policy allows it. Where they differ: `plain` (no query, a plain
    path), `hosts` (the operator's list, when any, is the only hosts allowed) and `any_port`
    (else 443 only, unless the operator lists the host with its port). `what` is called there,
    for the messages."""
    found, parts = _shape_problem(url, policy, example, plain=plain)
    if found is not None or parts is None:
        return found
    host, port = parts
    if "." not in host or host.endswith(PRIVATE_SUFFIXES):
        return "must name a public host (a name with a public domain)"
    if hosts:
        if not _in(host, 443 if port is None else port, list(hosts)):
            return f"is not on a host the operator allows {what} on"
    elif port not in (None, 443) and not any_port:
        return f"names port {port}; {what} are called on port 443"
    return None


def _shape_problem(
    endpoint: str,
    policy: EndpointPolicy,
    example: str = "https://NAME.openai.azure.com",
    *,
    plain: bool = True,
) -> tuple[str | None, tuple[str, int | None] | None]:
    """What every endpoint must be: (its problem, None) or (None, (host, port)); (None, None)
    for a loopback endpoint the policy allows. Not `plain`: any path and query."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return "is not a valid URL", None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        return f"must be an https URL such as {example}", None
    if "@" in parts.netloc:
        return "must not carry a user name or password ('user@' before the host)", None
    if parts.fragment or endpoint.endswith("#"):
        return "must not carry a fragment", None
    if plain and (parts.query or endpoint.endswith("?")):
        return "must not carry a query", None
    if plain and (_PATH.match(parts.path) is None or {".", ".."} & set(parts.path.split("/"))):
        return "may have a plain path only (letters, digits and '._~-' between slashes)", None
    loopback = host in LOOPBACK_HOSTS
    if loopback and policy.allow_loopback:
        return None, None  # the simulator of a local run or the tests, any port, http or https
    if loopback or _ip_literal(host):
        return "must name a host, not an IP address or localhost", None
    if _HOST.match(host) is None:
        return "must name a host of letters, digits, '-' and '.'", None
    if parts.scheme != "https":
        return "must be https", None
    return None, (host, port)
