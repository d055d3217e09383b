"""One error envelope for every service: the OpenAI shape ``{"error": {message, type, param, code}}``.

Exceptions carry their HTTP status; ``install_error_handlers`` maps them, reshapes FastAPI's own
``HTTPException`` and validation errors into the same body, and turns anything unexpected into a 500
whose body holds no stack trace (the traceback goes to the log with the request id). That 500 is sent by
Starlette's outermost middleware, past the one that stamps ``X-Request-ID`` on every other response, so
its handler adds the header itself: the id the body asks the user to quote is also in the headers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.logging import request_id_var

REQUEST_ID_HEADER = "X-Request-ID"  # the same name as services.common.app's (which imports this module)
logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    """Body of every non-2xx response of every service."""

    error: ErrorInfo


class ServiceError(Exception):
    """Base of the errors a service answers with; subclasses fix the status and the machine code."""

    status_code = 500
    error_type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        )


class InvalidInput(ServiceError):
    """400: the request is malformed or a value is out of range."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    """413: the upload exceeds a size or pixel limit."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """415: the upload is not an image format we decode."""

    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class UnprocessableImage(ServiceError):
    """422: the bytes claim to be an image but cannot be decoded (truncated, corrupt)."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_image"


class NotFound(ServiceError):
    """404: an unknown model, domain collection or route."""

    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class DependencyUnavailable(ServiceError):
    """503: a service this one needs is down or not ready."""

    status_code = 503
    error_type = "service_unavailable"
    code = "dependency_unavailable"


class DependencyTimeout(ServiceError):
    """504: a service this one needs did not answer in time."""

    status_code = 504
    error_type = "timeout"
    code = "dependency_timeout"


class NotReady(ServiceError):
    """503: this service has not finished loading its models."""

    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"


def error_body(message: str, *, code: str, error_type: str, param: str | None = None) -> dict:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=error_type, param=param, code=code)
    ).model_dump()


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param:
        message = f"'{param}' is required"
    elif param:
        message = f"'{param}': {message}"
    return message, param


_STATUS_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope for our errors, FastAPI's errors and unexpected exceptions."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = getattr(exc, "headers", None)  # e.g. Retry-After on 429/503
        return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        body = error_body(message, code="invalid_input", error_type="invalid_request_error", param=param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        body = error_body(str(exc.detail), code=code, error_type="invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None) or request_id_var.get()
        logger.exception("unhandled error (request %s)", request_id, exc_info=exc)
        body = error_body(
            f"internal error; quote request id {request_id} when reporting it",
            code="internal_error",
            error_type="internal_error",
        )
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return JSONResponse(body, status_code=500, headers=headers)
