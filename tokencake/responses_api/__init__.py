"""The OpenAI Responses API (``POST /v1/responses``) on top of the chat pipeline.

* :mod:`~tokencake.responses_api.request` - a Responses body translated into a chat body;
* :mod:`~tokencake.responses_api.output` - the ``Response`` object and its streaming events;
* :mod:`~tokencake.responses_api.store` - the bounded store behind ``previous_response_id``.
"""

from __future__ import annotations

from tokencake.responses_api.output import (
    ResponseEvents,
    assistant_message,
    finish_status,
    new_response_id,
    output_items,
    response_object,
    usage_object,
)
from tokencake.responses_api.request import (
    ResponsesRequest,
    UnknownResponse,
    parse_responses_request,
    rename_param,
)
from tokencake.responses_api.store import ResponseStore

__all__ = [
    "ResponseEvents",
    "ResponseStore",
    "ResponsesRequest",
    "UnknownResponse",
    "assistant_message",
    "finish_status",
    "new_response_id",
    "output_items",
    "parse_responses_request",
    "rename_param",
    "response_object",
    "usage_object",
]
