"""A local Entra ID for the tests: OpenID configuration and signing keys on 127.0.0.1, and
access tokens signed with those keys (or with keys it does not publish, to be refused)."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

COGNITIVE_AUDIENCE = "https://cognitiveservices.azure.com"


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class LocalIssuer:
    """Tenants' `/{tenant}/v2.0/.well-known/openid-configuration` and JWKS, counting fetches.

    Every tenant publishes the same keys; tokens name their tenant in `tid` and, as Entra's
    tokens for Azure OpenAI do, the v1 issuer `https://sts.windows.net/{tid}/`.
    """

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.hits: Counter[tuple[str, str]] = Counter()  # (configuration or keys, tenant)
        self.kid = self.publish_new_key()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                tenant = parts[0]
                if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                    issuer.hits["configuration", tenant] += 1
                    self._json(
                        {
                            "issuer": f"{issuer.authority}/{tenant}/v2.0",
                            "jwks_uri": f"{issuer.authority}/{tenant}/discovery/v2.0/keys",
                        }
                    )
                elif parts[1:] == ["discovery", "v2.0", "keys"]:
                    issuer.hits["keys", tenant] += 1
                    self._json({"keys": issuer.published()})
                else:
                    self.send_error(404)

            def _json(self, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.authority = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish_new_key(self) -> str:
        """Publish one more signing key, as Entra does before it signs with it; its id.

        Tokens are signed with it only when `token(kid=...)` names it."""
        kid = secrets.token_urlsafe(12)
        self.keys[kid] = new_rsa_key()
        return kid

    def key_fetches(self, tenant: str) -> int:
        """How often the tenant's signing keys (its JWKS) were fetched."""
        return self.hits["keys", tenant]

    def published(self) -> list[dict[str, Any]]:
        published = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "use": "sig"})
        return published

    def token(
        self,
        tenant: str,
        *,
        oid: str | None = None,
        name: str = "ada@contoso.com",
        audience: str = COGNITIVE_AUDIENCE,
        issuer: str | None = None,
        lifetime: float = 3600,
        not_before: float | None = None,
        groups: list[str] | None = None,
        roles: list[str] | None = None,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        """An access token as Entra issues it (v1 form), signed with the current key unless
        `kid` or `key` say otherwise."""
        now = int(time.time())
        body: dict[str, Any] = {
            "aud": audience,
            "iss": issuer or f"https://sts.windows.net/{tenant}/",
            "iat": now,
            "nbf": now - 300 if not_before is None else int(not_before),
            "exp": int(now + lifetime),
            "tid": tenant,
            "oid": oid or str(uuid.uuid4()),
            "ver": "1.0",
            **claims,
        }
        if name:
            body["upn"] = name
        if groups is not None:
            body["groups"] = groups
        if roles is not None:
            body["roles"] = roles
        kid = kid or self.kid
        signing_key = key or self.keys[kid]
        return jwt.encode(body, signing_key, algorithm="RS256", headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
