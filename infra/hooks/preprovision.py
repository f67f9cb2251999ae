"""azd preprovision hook: refuse to provision with a missing or wrong encryption key.

AIPROXY_ENCRYPTION_KEY seals attendee keys (and upstream keys outside Key Vault); provisioning
stores it in Key Vault, where the app reads it. A different key makes everything sealed so far
unreadable, so the hook never invents one for an environment that was provisioned before: it
tells how to fetch the key from the vault instead. It also catches sign-in switched on without
an app registration. azd passes its environment to hooks as environment variables.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Mapping

SECRET_NAME = "aiproxy-encryption-key"
_FERNET_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=$")
_TRUE = ("1", "true", "yes", "on")

GENERATE_POSIX = (
    'azd env set AIPROXY_ENCRYPTION_KEY "$(python3 -c'
    " 'import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())')\""
)
GENERATE_PWSH = (
    "azd env set AIPROXY_ENCRYPTION_KEY (python -c"
    " 'import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
)


def is_fernet_key(value: str) -> bool:
    """True for 32 bytes in url-safe base64, the only key Fernet accepts."""
    return bool(_FERNET_KEY.match(value)) and len(base64.urlsafe_b64decode(value)) == 32


def problems(env: Mapping[str, str]) -> list[str]:
    """What stops this environment from being provisioned, as sentences with the fix."""
    found = []
    key = env.get("AIPROXY_ENCRYPTION_KEY", "")
    vault = env.get("AZURE_KEY_VAULT_NAME", "")
    if not key and vault:
        found.append(
            "AIPROXY_ENCRYPTION_KEY is not set, but this environment was provisioned before. "
            "Use the key already in use (a new one would make sealed keys unreadable):\n"
            f'  azd env set AIPROXY_ENCRYPTION_KEY "$(az keyvault secret show --vault-name {vault}'
            f' --name {SECRET_NAME} --query value -o tsv)"'
        )
    elif not key:
        found.append(
            "AIPROXY_ENCRYPTION_KEY is not set. Create one for this environment, keep it safe "
            f"and never change it:\n  {GENERATE_POSIX}\n  (PowerShell: {GENERATE_PWSH})"
        )
    elif not is_fernet_key(key):
        found.append(
            "AIPROXY_ENCRYPTION_KEY is not a Fernet key (32 random bytes, url-safe base64, "
            f"44 characters). For a new environment create one with:\n  {GENERATE_POSIX}"
        )
    auth_enabled = env.get("AIPROXY_AUTH_ENABLED", "").strip().lower() in _TRUE
    if auth_enabled and not env.get("AIPROXY_AUTH_CLIENT_ID"):
        found.append(
            "AIPROXY_AUTH_ENABLED is on but AIPROXY_AUTH_CLIENT_ID is empty: set the application "
            "(client) id of the Entra app registration (see README, Deploy to Azure)."
        )
    return found


def main() -> int:
    found = problems(os.environ)
    for problem in found:
        print(f"preprovision: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
