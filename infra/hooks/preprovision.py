"""azd preprovision hook: make the environment's secrets, and refuse options azd would mangle.

Two secrets reach Bicep as @secure() parameters, which stores them in Key Vault where the app
reads them by reference:
- AIPROXY_ENCRYPTION_KEY seals attendee keys (and upstream keys outside Key Vault). A new
  environment gets one made here, so `azd up` needs no manual step. A different key makes
  everything sealed so far unreadable, so the hook never invents one for an environment that was
  provisioned before: it tells how to fetch the key from the vault instead.
- AIPROXY_OPERATOR_KEY is the operator's credential (header x-aiproxy-operator-key: every event,
  every route). It is made here whenever it is missing: nothing is sealed with it, so a new one
  only replaces the old credential at the next provision.
Made secrets go to the azd environment with `azd env set` (azd reloads the environment after a
hook and before it reads infra/main.parameters.json) and are never printed.

It also catches sign-in switched on without an app registration, and more always-ready
instances than the app may scale to. azd passes its environment to hooks as environment
variables.

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
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping

SECRET_NAME = "aiproxy-encryption-key"
OPERATOR_SECRET_NAME = "aiproxy-operator-key"
_FERNET_KEY = re.compile(r"[A-Za-z0-9_-]{43}=")
# The operator key travels in an HTTP header: url-safe characters only, and at least as long as
# infra/main.bicep's @minLength (32 characters of base64 carry 192 random bits).
OPERATOR_KEY_MIN_LENGTH = 32
_OPERATOR_KEY = re.compile(r"[A-Za-z0-9_-]+")

# Exactly the spellings Go's strconv.ParseBool accepts (and so azd, for bool parameters).
TRUE_SPELLINGS = frozenset({"1", "t", "T", "TRUE", "true", "True"})
FALSE_SPELLINGS = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# strconv.ParseInt(value, 10, 64): an optional sign and ASCII digits, nothing else.
_GO_INT = re.compile(r"[+-]?[0-9]+")

# azd environment values that become bool parameters of infra/main.bicep.
BOOL_OPTIONS = ("AIPROXY_AUTH_ENABLED", "AIPROXY_CREATE_OPENAI")
# azd environment values that become int parameters: (lowest, highest, default), as declared in
# infra/main.bicep (tests/test_infra.py keeps the two in step).
INT_OPTIONS = {
    "AIPROXY_MAXIMUM_INSTANCE_COUNT": (40, 1000, 100),
    "AIPROXY_HTTP_CONCURRENCY": (1, 1000, 64),
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


def new_encryption_key() -> str:
    """A fresh Fernet key: 32 random bytes, url-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def new_operator_key() -> str:
    """A fresh operator key: 32 random bytes, url-safe base64 without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def is_operator_key(value: str) -> bool:
    """True for a key long enough and safe to send as a header value."""
    return len(value) >= OPERATOR_KEY_MIN_LENGTH and bool(_OPERATOR_KEY.fullmatch(value))


def is_fernet_key(value: str) -> bool:
    """True for 32 bytes in url-safe base64, the only key Fernet accepts."""
    return bool(_FERNET_KEY.fullmatch(value)) and len(base64.urlsafe_b64decode(value)) == 32


def parse_bool(value: str) -> bool | None:
    """The boolean azd makes of an option's value; None when azd would drop it."""
    if value in TRUE_SPELLINGS:
        return True
    if value in FALSE_SPELLINGS:
        return False
    return None


def parse_int(value: str) -> int | None:
    """The integer azd makes of an option's value; None when azd would drop it."""
    return int(value) if _GO_INT.fullmatch(value) else None


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


def scale_problems(env: Mapping[str, str]) -> list[str]:
    """Always-ready instances beyond the most the app may scale to (Bicep cannot compare two
    parameters before deploying, short of the experimental assert)."""
    counts = {}
    for name in ("AIPROXY_ALWAYS_READY", "AIPROXY_MAXIMUM_INSTANCE_COUNT"):
        number = parse_int(env.get(name, ""))
        # Unset takes the default; a malformed value is reported by option_problems.
        counts[name] = INT_OPTIONS[name][2] if number is None else number
    always_ready, maximum = counts["AIPROXY_ALWAYS_READY"], counts["AIPROXY_MAXIMUM_INSTANCE_COUNT"]
    if always_ready <= maximum:
        return []
    return [
        f"AIPROXY_ALWAYS_READY is {always_ready}, more than AIPROXY_MAXIMUM_INSTANCE_COUNT "
        f"({maximum}): always-ready instances count towards the maximum. Lower one or raise "
        f"the other:\n  azd env set AIPROXY_ALWAYS_READY {maximum}\n"
        f"  azd env set AIPROXY_MAXIMUM_INSTANCE_COUNT {max(always_ready, 40)}"
    ]


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
    operator_key = env.get("AIPROXY_OPERATOR_KEY", "")
    if not operator_key:
        found.append(
            "AIPROXY_OPERATOR_KEY is not set. Run this hook through azd (azd provision, or "
            "azd hooks run preprovision), which makes one."
        )
    elif not is_operator_key(operator_key):
        found.append(
            f"AIPROXY_OPERATOR_KEY must be at least {OPERATOR_KEY_MIN_LENGTH} characters of "
            "letters, digits, '-' and '_' (it is sent as a header). Empty it and this hook "
            'makes a strong one at the next provision:\n  azd env set AIPROXY_OPERATOR_KEY ""'
        )
    found.extend(option_problems(env))
    found.extend(scale_problems(env))
    if parse_bool(env.get("AIPROXY_AUTH_ENABLED", "")) and not env.get("AIPROXY_AUTH_CLIENT_ID"):
        found.append(
            "AIPROXY_AUTH_ENABLED is on but AIPROXY_AUTH_CLIENT_ID is empty: set the application "
            "(client) id of the Entra app registration (see docs/deploy.md, Deploy to Azure)."
        )
    return found


def make_secrets(env: MutableMapping[str, str], store: Callable[[str, str], None]) -> list[str]:
    """Make the secrets a new environment lacks: store each (azd env set) and put it in `env`.

    Returns what was made, as sentences without the values. The encryption key is made only for
    an environment never provisioned (no vault yet): a provisioned one must keep the key in use.
    """
    made = []
    if not env.get("AIPROXY_ENCRYPTION_KEY") and not env.get("AZURE_KEY_VAULT_NAME"):
        store("AIPROXY_ENCRYPTION_KEY", key := new_encryption_key())
        env["AIPROXY_ENCRYPTION_KEY"] = key
        made.append(
            "made AIPROXY_ENCRYPTION_KEY for this new environment (kept in the azd environment "
            f"and, once provisioned, in Key Vault as {SECRET_NAME}); never change it."
        )
    if not env.get("AIPROXY_OPERATOR_KEY"):
        store("AIPROXY_OPERATOR_KEY", key := new_operator_key())
        env["AIPROXY_OPERATOR_KEY"] = key
        vault = env.get("AZURE_KEY_VAULT_NAME") or "<AZURE_KEY_VAULT_NAME>"
        made.append(
            "made a new AIPROXY_OPERATOR_KEY; it replaces any earlier one at this provision. "
            "Read it with:\n  azd env get-value AIPROXY_OPERATOR_KEY\n  or az keyvault secret "
            f"show --vault-name {vault} --name {OPERATOR_SECRET_NAME} --query value -o tsv"
        )
    return made


def azd_env_set(name: str, value: str) -> None:
    """Store one value in the azd environment this hook runs for."""
    azd = shutil.which("azd")
    if azd is None:
        raise RuntimeError(f"azd is not on PATH, so {name} could not be stored")
    command = [azd, "env", "set"]
    # The environment azd runs the hook for, which need not be the default one (azd up -e NAME).
    if environment := os.environ.get("AZURE_ENV_NAME"):
        command += ["--environment", environment]
    # "--": a value may start with "-", which would otherwise read as a flag.
    command += ["--", name, value]
    # Output is dropped: nothing azd says about the value belongs in a log.
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"azd env set {name} failed (exit code {result.returncode})")


def main() -> int:
    env = dict(os.environ)
    try:
        made = make_secrets(env, azd_env_set)
    except RuntimeError as error:
        print(f"preprovision: {error}", file=sys.stderr)
        return 1
    for sentence in made:
        print(f"preprovision: {sentence}", file=sys.stderr)
    found = problems(env)
    for problem in found:
        print(f"preprovision: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
