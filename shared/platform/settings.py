"""The one place that reads configuration.

Every setting the app reads is named here, with its default, so that local.settings.example.json,
the Bicep app settings and this module can be checked against each other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache

# Azurite's well-known development account; only ever a default for local runs.
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    f"AccountKey={AZURITE_ACCOUNT_KEY};"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


# A setting written as names with commas between them (spaces around each are dropped).
type Names = tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Configuration of one process, read from the environment (app settings)."""

    # Table Storage: a connection string locally, an endpoint plus managed identity in Azure.
    storage_connection_string: str = ""
    storage_table_endpoint: str = ""
    table_prefix: str = "aiproxy"
    # Fernet key (urlsafe base64, 32 bytes) sealing upstream keys and attendee keys at rest.
    encryption_key: str = ""
    # Key Vault URL; when set, upstream keys live there instead of sealed in tables.
    key_vault_url: str = ""
    # Client id of the user-assigned identity used for storage, Key Vault and upstreams.
    managed_identity_client_id: str = ""
    default_api_version: str = "2024-10-21"
    max_body_bytes: int = 26_214_400
    cache_ttl_seconds: float = 5.0
    usage_flush_seconds: float = 1.0
    # Where usage records wait on disk while storage is down ("": the system temp folder).
    usage_spill_dir: str = ""
    usage_retention_days: int = 30
    sync_seconds: float = 1.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 60.0
    stream_idle_timeout: float = 60.0
    upstream_total_timeout: float = 220.0
    # How long after its admission a call that wrote no usage record is taken for lost with its
    # worker (then recorded at its worst case): longer than a call may run. 0: no journal.
    call_expiry_seconds: float = 300.0
    # How long a realtime call's setup waits for its metering to join the call's sideband
    # before it hangs the call up and refuses it (503 storage_unavailable).
    realtime_attach_seconds: float = 20.0
    # Upstream endpoints beyond Azure AI services' hosts (shared/directory/endpoints.py): exact
    # hosts or '.suffixes', each optionally ':port', commas; and whether http://127.0.0.1,
    # localhost and [::1] are allowed (local runs and tests only: never on Azure).
    upstream_hosts: Names = ()
    allow_loopback_upstreams: bool = False
    # MCP servers (model class mcp): none lets resources name any public https host on 443; a
    # list (same syntax as upstream_hosts) allows only those hosts.
    mcp_hosts: Names = ()
    trust_easyauth: bool = False
    # Self-registration (shared/access/codes.py): wrong shared codes an event answers in any
    # minute, over all instances, before it refuses the wrong ones with 429; and new attendees
    # one client address may create with an event's code in any hour.
    wrong_codes_per_event_minute: int = 30
    new_attendees_per_address_hour: int = 200
    # Entra ID access tokens (shared/access/entra.py): where tenants publish their signing keys,
    # and the least time between two fetches of one tenant's keys for an unknown key id.
    entra_authority: str = "https://login.microsoftonline.com"
    entra_key_refetch_seconds: float = 60.0
    # Organisers by token: their tenants, the audience of their tokens (the app registration),
    # and the groups (object ids) or app roles that make a principal an organiser; commas.
    entra_organizer_tenants: Names = ()
    entra_organizer_audience: Names = ()
    entra_organizer_groups: Names = ()
    entra_organizer_roles: Names = ()
    # The operator: a secret of its own, sent in the x-aiproxy-operator-key header ("": no
    # operator key), and the app roles or groups (object ids) that make a signed-in principal
    # the operator; commas.
    operator_key: str = ""
    entra_operator_roles: Names = ()
    entra_operator_groups: Names = ()
    # OpenTelemetry to Application Insights when set.
    appinsights_connection_string: str = ""
    # Dev host only: the key that function-level routes require locally.
    function_key: str = ""
    # Plugins (shared/plugins): names, in order; each has its JSON config in
    # AIPROXY_PLUGIN_<NAME> (plugin_config below).
    plugins: Names = ()
    # The longest an async request hook may take before the call is refused (or let through).
    plugins_request_budget_ms: float = 250.0
    # The longest a usage sink may take with one batch, per attempt.
    plugins_usage_budget_seconds: float = 10.0


# Each setting is AIPROXY_ and its field name in capitals, but for the two that Azure names.
_AZURE_NAMES = {
    "managed_identity_client_id": "AZURE_CLIENT_ID",
    "appinsights_connection_string": "APPLICATIONINSIGHTS_CONNECTION_STRING",
}
_ENV_NAMES = {
    field.name: _AZURE_NAMES.get(field.name, f"AIPROXY_{field.name.upper()}")
    for field in fields(Settings)
}

# Settings the Functions host resolves itself (%NAME% in bindings: the timers' schedules, the
# queue trigger's queue); the app reads them with `binding_setting`.
SCHEDULE_SETTINGS = {
    "AIPROXY_ROLLUP_SCHEDULE": "0 */5 * * * *",
    "AIPROXY_RETENTION_SCHEDULE": "0 30 3 * * *",
    # The Storage queue of realtime calls to meter (function_app.py's queue trigger).
    "AIPROXY_REALTIME_QUEUE": "aiproxy-realtime",
}


def binding_setting(name: str) -> str:
    """A setting of SCHEDULE_SETTINGS, as the Functions host resolves it for the bindings."""
    return os.environ.get(name) or SCHEDULE_SETTINGS[name]


def env_names() -> list[str]:
    """Every app setting name this app reads."""
    return sorted([*_ENV_NAMES.values(), *SCHEDULE_SETTINGS])


def plugin_setting_name(plugin: str) -> str:
    """The setting holding a plugin's JSON config: AIPROXY_PLUGIN_ and its name in capitals,
    other characters than letters and digits as '_' (`mycompany.rules:Plugin` ->
    AIPROXY_PLUGIN_MYCOMPANY_RULES_PLUGIN)."""
    return "AIPROXY_PLUGIN_" + re.sub(r"[^A-Z0-9]", "_", plugin.upper())


def plugin_config(plugin: str, environ: Mapping[str, str] | None = None) -> str:
    """A plugin's config as written in its setting ("" when unset)."""
    env = os.environ if environ is None else environ
    return env.get(plugin_setting_name(plugin), "")


def _convert(raw: str, kind: type, name: str) -> object:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is tuple:  # Names
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"app setting {name}={raw!r} is not a valid {kind.__name__}") from exc


def load(environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping (os.environ by default)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for field in fields(Settings):
        name = _ENV_NAMES[field.name]
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        kind = type(getattr(Settings, field.name))
        values[field.name] = _convert(raw, kind, name)
    if not values.get("storage_connection_string") and not values.get("storage_table_endpoint"):
        jobs = env.get("AzureWebJobsStorage", "")
        values["storage_connection_string"] = (
            AZURITE_CONNECTION_STRING if jobs in ("", "UseDevelopmentStorage=true") else jobs
        )
    return Settings(**values)


@lru_cache(maxsize=1)
def get() -> Settings:
    """The settings of this process, read once."""
    return load()
