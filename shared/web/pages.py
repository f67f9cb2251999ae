"""The web pages (docs/api.md#attendee-routes-and-pages): attendee playground, registration page, organiser console.

The pages are static files under `pages/` that ship with the app. An HTML page gets the app's
base path and the sign-in configuration filled in as data attributes; scripts, stylesheets
and the vendored libraries come from an allow-list of the files in `pages/`. Every answer
carries a strict Content-Security-Policy, so no inline script or style can run.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from shared.platform import settings

PAGES_DIR = Path(__file__).resolve().parents[2] / "pages"

# Images may also come from https: the event's picture and images in its description live
# on the organiser's site. Everything else comes from the app itself.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
# What the asset route serves, by suffix; HTML pages are served by their own routes only.
ASSET_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# App Service authentication providers offered on the registration page when it is trusted.
SIGN_IN_PROVIDERS = (("aad", "Microsoft"), ("github", "GitHub"))
PAGES = ("playground", "register", "console")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    """Every file the asset route may serve, by its path under pages/ ('vendor/marked.min.js')."""
    found: dict[str, Asset] = {}
    for path in sorted(PAGES_DIR.rglob("*")):
        content_type = ASSET_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found[path.relative_to(PAGES_DIR).as_posix()] = Asset(body, content_type, etag)
    return found


@cache
def _template(name: str) -> str:
    return (PAGES_DIR / f"{name}.html").read_text(encoding="utf-8")


def base_path(request: Request, route_start: str) -> str:
    """The app's path prefix as the page was reached ('/api'): everything before the route."""
    path = request.url.path
    cut = path.lower().rfind("/" + route_start.lower())
    return path[:cut] if cut >= 0 else ""


def render(name: str, values: dict[str, str]) -> str:
    """The page with `{{name}}` placeholders replaced by HTML-escaped values."""
    page = _template(name)
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(value, quote=True))
    return page


def page(request: Request, name: str, **values: str) -> Response:
    """One of PAGES, with the base path and sign-in configuration filled in."""
    base = base_path(request, "register/" if name == "register" else name)
    providers = (
        " ".join(f"{key}:{label}" for key, label in SIGN_IN_PROVIDERS)
        if settings.get().trust_easyauth
        else ""
    )
    body = render(name, {"base": base, "sign_in": providers, **values})
    return Response(
        body,
        200,
        {**SECURITY_HEADERS, "cache-control": "no-cache"},
        media_type="text/html; charset=utf-8",
    )


def asset(request: Request, path: str) -> Response:
    """A script, stylesheet, image or licence from pages/, or 404 for anything else."""
    found = assets().get(path)
    if found is None:
        return Response(
            "Not found.",
            404,
            {"x-content-type-options": "nosniff"},
            media_type="text/plain; charset=utf-8",
        )
    headers = {**SECURITY_HEADERS, "etag": found.etag, "cache-control": "no-cache"}
    if found.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(found.body, 200, headers, media_type=found.content_type)
