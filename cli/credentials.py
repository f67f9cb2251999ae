"""Who the command line calls manage/* as: the operator (the operator key) or an organiser (an
Entra access token, pasted or fetched with azure-identity), from flags or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

OPERATOR_HEADER = "x-aiproxy-operator-key"
# Flag, environment variable: one of them names the credential; a flag wins over the environment.
SOURCES = (
    ("--operator-key", "AIPROXY_OPERATOR_KEY"),
    ("--token", "AIPROXY_TOKEN"),
    ("--entra-scope", "AIPROXY_ENTRA_SCOPE"),
)
HOW_TO_SIGN_IN = (
    "the operator passes --operator-key or sets AIPROXY_OPERATOR_KEY (the app setting of that "
    "name); organisers pass --entra-scope api://<client id>/.default or set AIPROXY_ENTRA_SCOPE "
    "(a token from `az login`), or pass --token / set AIPROXY_TOKEN"
)


class CredentialError(Exception):
    """No usable credential: none given, several, or no Entra token to be had (exit code 2)."""


@dataclass(frozen=True)
class Credential:
    """The one header that proves who calls, and where its value came from (for error hints)."""

    kind: Literal["operator", "token"]
    value: str
    source: str  # the flag or variable it came from, or "an Entra token for <scope>"

    @property
    def header(self) -> dict[str, str]:
        if self.kind == "operator":
            return {OPERATOR_HEADER: self.value}
        return {"authorization": f"Bearer {self.value}"}

    def refused_hint(self) -> str:
        """What to check when the app answers 401 to this credential."""
        if self.kind == "operator":
            return (
                f"the operator key from {self.source} must equal the app setting "
                "AIPROXY_OPERATOR_KEY (local runs: local.settings.json)"
            )
        if self.source.startswith("an Entra token"):
            return (
                f"{self.source} was refused: is the scope the app registration's "
                "(api://<client id>/.default), and are you signed in as yourself (az login)?"
            )
        return (
            f"the token from {self.source} was refused: tokens expire after about an hour; "
            "get a new one, or let --entra-scope api://<client id>/.default fetch it"
        )


def resolve(
    flags: dict[str, str | None], environ: Mapping[str, str] | None = None, *, legacy_key: bool
) -> Credential:
    """The credential the flags name, else the environment; a usage error when none or several.

    `flags` maps each flag of SOURCES to its value (None when not given); `legacy_key` says
    the obsolete --key flag was given.
    """
    env = os.environ if environ is None else environ
    given = [(flag, value.strip()) for flag, value in flags.items() if value and value.strip()]
    if len(given) > 1:
        names = " and ".join(flag for flag, _ in given)
        raise CredentialError(f"{names} were both given: pass only one credential")
    if not given:
        given = [(var, env[var].strip()) for _, var in SOURCES if env.get(var, "").strip()]
        if len(given) > 1:
            names = " and ".join(var for var, _ in given)
            raise CredentialError(
                f"{names} are all set: unset all but one, or choose with "
                "--operator-key, --token or --entra-scope"
            )
    if not given:
        if legacy_key or env.get("AIPROXY_FUNCTION_KEY", "").strip():
            raise CredentialError(
                "the function key (--key, AIPROXY_FUNCTION_KEY) no longer opens manage/*: "
                + HOW_TO_SIGN_IN
            )
        raise CredentialError("no credential: " + HOW_TO_SIGN_IN)
    (source, value), *_ = given
    if source in ("--operator-key", "AIPROXY_OPERATOR_KEY"):
        return Credential("operator", value, source)
    if source in ("--token", "AIPROXY_TOKEN"):
        return Credential("token", value.removeprefix("Bearer ").strip(), source)
    return Credential("token", entra_token(value, source), f"an Entra token for {value}")


def entra_token(scope: str, source: str) -> str:
    """An access token for `scope` from DefaultAzureCredential (az login, azd, environment,
    managed identity, workload identity)."""
    if "://" not in scope or not scope.endswith("/.default"):
        raise CredentialError(
            f"{source} must be the app's scope, e.g. api://<client id>/.default, not {scope!r}"
        )
    # Imported here: azure-identity takes longer to import than the rest of the CLI together.
    import logging

    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    # Its own warnings repeat the error below, on stderr, unless somebody handles them.
    logging.getLogger("azure").addHandler(logging.NullHandler())
    logging.getLogger("azure").propagate = False
    credential = DefaultAzureCredential()
    try:
        return credential.get_token(scope).token
    except ClientAuthenticationError as exc:
        detail = "\n".join("  " + line.strip() for line in str(exc.message).splitlines()[1:])
        raise CredentialError(
            f"cannot get an Entra token for {scope}: sign in with `az login` (or `azd auth "
            "login`), or pass --token" + (f"\n{detail}" if detail.strip() else "")
        ) from exc
    finally:
        credential.close()
