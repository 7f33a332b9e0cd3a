"""HTTP refusals: the OpenAI-style error body, and the one map from a typed rejection
(:class:`~tokencake.scheduler.errors.RequestRejected`, raised where a problem is found) to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.faults import RequestFault


class APIError(Exception):
    """A refusal with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


def bad(message: str, param: str | None) -> APIError:
    """A 400 naming the field (the protocol's own checks)."""
    return APIError(400, message, param)


def rejection_error(exc: RequestRejected, wire_names: Mapping[str, str]) -> APIError:
    """The HTTP answer to a rejection: its status and code, and its ``param`` spelled as the
    client spelled it (``wire_names`` maps the head of the engine's dotted path, e.g.
    ``prompt`` -> ``messages``, ``metadata`` -> ``vllm_xargs.tokencake``)."""
    param = exc.param
    if param is not None:
        head, dot, rest = param.partition(".")
        param = wire_names.get(head, head) + dot + rest
    return APIError(exc.status, exc.message, param, code=exc.code)


def fault_error(exc: RequestFault) -> APIError:
    """The HTTP answer to a request aborted by its own data (accepted, then found unusable by
    the scheduler, a policy or postprocessing): a 400, never a 5xx; other requests ran on."""
    return APIError(exc.status, exc.message, None, code="request_fault")
