"""Errors as OpenAI sends them, `{"error": {"message", "type", "param", "code"}}`, for every failure:
our own, FastAPI's validation errors and HTTP errors, and anything unexpected (without a traceback)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bitnet158.errors import UserError
from bitnet158.serve.middleware import error_body

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def _json(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content=_json(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(status_code=400, content=_json(
            APIError(400, message, "invalid_request_error", "invalid_value", ".".join(where) or None)))

    @app.exception_handler(UserError)
    async def user_error(_: Request, err: UserError) -> JSONResponse:
        return JSONResponse(status_code=400, content=_json(APIError(400, str(err), "invalid_request_error")))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        error = APIError(err.status_code, str(err.detail), _TYPES.get(err.status_code, "invalid_request_error"))
        return JSONResponse(status_code=err.status_code, content=_json(error), headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the traceback goes to the log, never to the client
        return JSONResponse(status_code=500, content=_json(APIError(500, "Internal server error.", "server_error")))
