"""The server's front door, as plain ASGI (Starlette's BaseHTTPMiddleware would hide a client's disconnect
from the endpoints, which need it to cancel the client's rows):

- the API key is checked from the headers, before a byte of the body is read;
- a body over the limit is refused (413) from its Content-Length, or as soon as the stream passes it;
- every response is counted by route template (unmatched paths share one label) and status.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from starlette.exceptions import HTTPException

from gpt2_onnx.engine.metrics import Metrics

OPEN_PATHS = ("/health", "/", "/playground")  # probes and the page need no key


@dataclass(frozen=True)
class GuardConfig:
    api_key: str | None
    max_body_bytes: int


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so that FastAPI passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes (--max-body)")


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


class Guard:
    def __init__(self, app, config: GuardConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status_seen: list[int] = []

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                route = scope.get("route")
                self.metrics.count("http_responses_total", labels={
                    "route": getattr(route, "path", "unmatched"), "status": str(message["status"])})
            await send(message)

        if (refusal := self._refusal(scope)) is not None:
            return await _answer(counting_send, *refusal)
        limit, read = self.config.max_body_bytes, 0

        async def limited_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except BodyTooLarge:
            if not status_seen:
                await _answer(counting_send, *self._too_large())

    def _refusal(self, scope) -> tuple[int, bytes, dict] | None:
        headers = dict(scope["headers"])
        if self.config.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.config.api_key}".encode()):
                return 401, error_body("missing or wrong API key: send `Authorization: Bearer KEY`",
                                       "authentication_error", "invalid_api_key"), {}
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> tuple[int, bytes, dict]:
        return 413, error_body(BodyTooLarge(self.config.max_body_bytes).detail, "invalid_request_error",
                               "request_too_large"), {}


async def _answer(send, status: int, body: bytes, headers: dict) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
