"""The API key check in front of every route of the served application.

Clients send the key as `Authorization: Bearer KEY` (what the OpenAI clients do) or as
`api-key: KEY`. Only the key's SHA-256 travels to the cluster; requests are compared
against it in constant time. A missing or wrong key gets a 401 with an OpenAI-style body.
"""

from __future__ import annotations

import hashlib
import hmac

from services.errors import error_response


def key_digest(api_key: str) -> str | None:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest() if api_key else None


def presented_key(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        name = name.lower()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip().decode("latin-1")
        if name == b"api-key":
            return value.strip().decode("latin-1")
    return ""


class ApiKeyMiddleware:
    """Pure ASGI middleware (streamed responses pass through untouched)."""

    def __init__(self, app, digest: str | None):
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.digest is not None:
            key = presented_key(scope.get("headers", []))
            if not key or not hmac.compare_digest(key_digest(key), self.digest):
                reason = "wrong API key" if key else "missing API key (send it as 'Authorization: Bearer KEY')"
                response = error_response(401, reason, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
