"""Auth0-shaped OAuth errors: an HTTP status and a `{"error", "error_description"}` body."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class OAuthError(Exception):
    """An error the emulator answers with, exactly as Auth0 would shape it."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or {}
        self.extra = extra or {}  # more body fields, e.g. CIBA's new `interval` on slow_down

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": self.error, "error_description": self.description, **self.extra}


def invalid_request(description: str) -> OAuthError:
    """400 `invalid_request`: a parameter is missing, repeated or malformed."""
    return OAuthError(400, "invalid_request", description)


def unauthorized() -> OAuthError:
    """401 `access_denied`: client authentication failed (Auth0's answer to a bad secret)."""
    return OAuthError(401, "access_denied", "Unauthorized")


def unauthorized_client(grant_type: str) -> OAuthError:
    """403 `unauthorized_client`: the client may not use this grant."""
    return OAuthError(403, "unauthorized_client", f"Grant type '{grant_type}' not allowed for the client.")


def service_not_found(audience: str) -> OAuthError:
    """403 `access_denied`: no API with that audience (Auth0's wording)."""
    return OAuthError(403, "access_denied", f"Service not found: {audience}")


def error_response(error: OAuthError) -> JSONResponse:
    """The HTTP answer for `error`; token-endpoint answers are never cached (RFC 6749 §5.1)."""
    return JSONResponse(error.body(), status_code=error.status, headers={**NO_STORE, **error.headers})


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
