"""azd preprovision hook: refuse to provision with a missing or wrong encryption key.

AIPROXY_ENCRYPTION_KEY seals attendee keys (and upstream keys outside Key Vault); provisioning
stores it in Key Vault, where the app reads it. A different key makes everything sealed so far
unreadable, so the hook never invents one for an environment that was provisioned before: it
tells how to fetch the key from the vault instead. It also catches sign-in switched on without
an app registration. azd passes its environment to hooks as environment variables.

The options in infra/main.parameters.json reach Bicep as strings. azd converts them for bool and
int parameters with Go's strconv.ParseBool and strconv.ParseInt(value, 10, 64), and when that
fails it quietly drops the value, so the template's default is deployed instead (azd:
armParameterFileValue in pkg/infra/provisioning/bicep). The hook accepts exactly what those
functions accept and refuses anything else before it can be ignored.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Mapping

SECRET_NAME = "aiproxy-encryption-key"
_FERNET_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=$")

# Exactly the spellings Go's strconv.ParseBool accepts (and so azd, for bool parameters).
TRUE_SPELLINGS = frozenset({"1", "t", "T", "TRUE", "true", "True"})
FALSE_SPELLINGS = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# strconv.ParseInt(value, 10, 64): an optional sign and ASCII digits, nothing else.
_GO_INT = re.compile(r"^[+-]?[0-9]+$")

# azd environment values that become bool parameters of infra/main.bicep.
BOOL_OPTIONS = ("AIPROXY_AUTH_ENABLED", "AIPROXY_CREATE_OPENAI")
# azd environment values that become int parameters: (lowest, highest, default), as declared in
# infra/main.bicep (tests/test_infra.py keeps the two in step).
INT_OPTIONS = {
    "AIPROXY_MAXIMUM_INSTANCE_COUNT": (40, 1000, 100),
    "AIPROXY_HTTP_CONCURRENCY": (1, 1000, 16),
    "AIPROXY_ALWAYS_READY": (0, 1000, 0),
}

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


def parse_bool(value: str) -> bool | None:
    """The boolean azd makes of an option's value; None when azd would drop it."""
    if value in TRUE_SPELLINGS:
        return True
    if value in FALSE_SPELLINGS:
        return False
    return None


def parse_int(value: str) -> int | None:
    """The integer azd makes of an option's value; None when azd would drop it."""
    return int(value) if _GO_INT.match(value) else None


def option_problems(env: Mapping[str, str]) -> list[str]:
    """Options azd would not pass to Bicep as set (or Bicep would refuse), with the fix."""
    found = []
    for name in BOOL_OPTIONS:
        value = env.get(name, "")
        # Unset and empty both give the parameters file's default (drone/envsubst ${NAME=default}).
        if value and parse_bool(value) is None:
            found.append(
                f"{name} is {value!r}, which azd does not read as a boolean: it would deploy the "
                f"default instead. Use true or false:\n  azd env set {name} true\n"
                f"  azd env set {name} false"
            )
    for name, (lowest, highest, default) in INT_OPTIONS.items():
        value = env.get(name, "")
        if not value:
            continue
        number = parse_int(value)
        if number is None:
            found.append(
                f"{name} is {value!r}, which azd does not read as a whole number: it would deploy "
                f"the default instead. Set digits only, from {lowest} to {highest}, e.g. the "
                f"default:\n  azd env set {name} {default}"
            )
        elif not lowest <= number <= highest:
            found.append(
                f"{name} is {number}; it must be from {lowest} to {highest}:\n"
                f"  azd env set {name} {min(max(number, lowest), highest)}"
            )
    return found


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
    found.extend(option_problems(env))
    if parse_bool(env.get("AIPROXY_AUTH_ENABLED", "")) and not env.get("AIPROXY_AUTH_CLIENT_ID"):
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
