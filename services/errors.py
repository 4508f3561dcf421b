"""Every failure the served application returns, as an OpenAI-style error body
(`{"error": {"message", "type", "param", "code"}}`) with the right status:

- a client's mistake (bad parameter, prompt longer than the context, unknown model or
  path, wrong method) is a 4xx, never a 500;
- overload (the engine replicas' queues are full) and a replica that is restarting are a
  503 with `Retry-After`, so clients back off instead of piling on;
- anything else is a 500 whose body names the request id, not the traceback.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

logger = logging.getLogger("ray.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}
# Errors that mean "no replica can take this request right now": retry later. Ray Serve
# answers the first two itself with a plain-text 503 and no Retry-After, so the ingress
# re-raises all of them as `Unavailable`.
UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError,
               ActorUnavailableError)


class Unavailable(Exception):
    """No engine replica can take the request now (queues full, or restarting)."""

    def __init__(self, overloaded: bool):
        super().__init__("overloaded" if overloaded else "restarting")
        self.overloaded = overloaded
# The engine side wraps its messages as "Message: X, Internal exception: Y, original exception: Z".
_WRAPPED = re.compile(r"^Message: (?P<message>.*?), Internal exception: .*$", re.DOTALL)
_PARAM = re.compile(r"\(parameter=(?P<param>[\w.\[\]]+)")


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def clean_message(message: str) -> str:
    """The user-facing part of an engine-side error message."""
    match = _WRAPPED.match(message.strip())
    return match.group("message") if match else message.strip()


def client_error(status: int, message: str) -> JSONResponse:
    """A 4xx from the engine or the ingress, with the offending parameter when it is named."""
    message = clean_message(message)
    param = _PARAM.search(message)
    code = "context_length_exceeded" if "maximum context length" in message else None
    if status == 404:
        code = "model_not_found" if "model" in message.lower() else "not_found"
    return error_response(status, message, code=code, param=param.group("param") if param else None)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Route every exception a request can raise to an OpenAI-style response."""
    retry_after = {"Retry-After": str(retry_after_s)}

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return client_error(exc.status_code, str(exc.detail)) if exc.status_code < 500 else \
            _server_error(request, exc, exc.status_code)

    async def openai_error(request: Request, exc) -> JSONResponse:
        if exc.status_code in (429, 503):
            return error_response(exc.status_code, clean_message(exc.message), code="overloaded", headers=retry_after)
        if exc.status_code < 500:
            return client_error(exc.status_code, exc.message)
        return _server_error(request, exc, exc.status_code)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = f"invalid request: {first.get('msg', 'malformed body')}" + (f" (parameter={param})" if param else "")
        return error_response(400, message, param=param)

    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        reason = "server overloaded: the engine queues are full" if exc.overloaded \
            else "the model replica is restarting"
        return error_response(503, f"{reason}; retry after {retry_after_s}s", code="overloaded", headers=retry_after)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _server_error(request, exc, 500)

    from services.ray_llm_compat import OpenAIHTTPException

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(OpenAIHTTPException, openai_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Unavailable, unavailable)
    app.add_exception_handler(Exception, unexpected)


def _server_error(request: Request, exc: Exception, status: int) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    logger.error("request %s failed", request_id, exc_info=exc)
    return error_response(status, f"internal error (request id {request_id})", code="internal_error")
