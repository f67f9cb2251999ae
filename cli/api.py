"""The management API over HTTP, and the two ways a call fails: the API said no, or nobody answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from cli.credentials import Credential

USER_AGENT = "aiproxy-cli"


class ApiError(Exception):
    """The API answered with an error (4xx/5xx); the message is its one-line explanation."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, hint: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.hint = hint  # what to check on this side, when the CLI knows better than the API

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"

    @classmethod
    def from_response(
        cls, response: httpx.Response, credential: Credential | None = None
    ) -> ApiError:
        error = cls._parse(response)
        if error.status == 401 and credential is not None:
            error.hint = credential.refused_hint()
        return error

    @classmethod
    def _parse(cls, response: httpx.Response) -> ApiError:
        try:
            error = response.json()["error"]
            message = str(error.get("message", "")).strip() or response.reason_phrase
            details = error.get("details") or []
            if len(details) > 1:  # every bad field, on the one line the CLI prints
                message = "Bad fields: " + "; ".join(
                    f"'{d['field']}' {d['problem']}" for d in details
                )
            return cls(
                response.status_code, str(error.get("code", "error")), message, error.get("param")
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        text = " ".join(response.text.split())[:200]
        # The Functions host itself answers these, with no body (the app never sees the call):
        # a 401 means a deployment from before manage/* took the operator key or a token.
        if response.status_code == 401 and not text:
            return cls(
                401,
                "unauthorized",
                "The Functions host wants a function key for manage/*: this app is older than "
                "the operator key and Entra sign-in; deploy the current version.",
            )
        if response.status_code == 404 and not text:
            return cls(
                404,
                "not_found",
                f"No such route at {response.request.url.path}: is --endpoint the app's "
                "base URL ending in /api?",
            )
        return cls(response.status_code, "http_error", text or response.reason_phrase)


class Unreachable(Exception):
    """The endpoint did not answer (refused, unknown host, timed out)."""


@dataclass(frozen=True)
class Target:
    """Where the proxy is and who calls it."""

    endpoint: str  # the proxy's base URL, e.g. http://127.0.0.1:7071/api
    credential: Credential
    timeout: float = 30.0

    @property
    def manage_url(self) -> str:
        return f"{self.endpoint}/manage"

    @property
    def headers(self) -> dict[str, str]:
        return {**self.credential.header, "user-agent": USER_AGENT}


def normalize_endpoint(endpoint: str) -> str:
    """Accept the base URL with or without a trailing '/' or '/manage'."""
    endpoint = endpoint.strip().rstrip("/")
    if endpoint.endswith("/manage"):
        endpoint = endpoint[: -len("/manage")]
    return endpoint


class Api:
    """Blocking calls to manage/*: JSON in, JSON (or text) out, errors raised."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._client = httpx.Client(
            base_url=target.manage_url, headers=target.headers, timeout=target.timeout
        )

    def close(self) -> None:
        self._client.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {self.target.endpoint}: {describe(exc)}") from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response, self.target.credential)
        return response

    def json(self, method: str, path: str, **kw: Any) -> Any:
        response = self.send(method, path, **kw)
        return response.json() if response.content else None


def describe(exc: httpx.TransportError) -> str:
    """A short reason for a transport failure."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
