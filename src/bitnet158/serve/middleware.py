"""An ASGI layer in front of every route: the API key, the request body limit and per-status counts.

It is plain ASGI rather than `BaseHTTPMiddleware` so that streamed responses pass straight through.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitnet158.serve.metrics import Metrics

PUBLIC_PATHS = {"/health"}
COUNTED_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                code = str(message["status"])
                self.metrics.requests.labels(path, code).inc()
                if message["status"] >= 400:
                    self.metrics.errors.labels(code).inc()
            await send(message)

        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            body = error_body("Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                              "authentication_error", "invalid_api_key")
            await _respond(counting_send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            await _respond(counting_send, 413, self._too_large())
            return
        await self.app(scope, self._limited(receive), counting_send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.api_key.encode())

    def _too_large(self) -> bytes:
        return error_body(f"The request body is larger than {self.max_body_bytes} bytes.",
                          "invalid_request_error", "request_too_large")

    def _limited(self, receive: Receive) -> Receive:
        """Count the body as it arrives too: a chunked body has no Content-Length to check up front."""
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, f"The request body is larger than {self.max_body_bytes} bytes.")
            return message

        return receive_limited


async def _respond(send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
