"""Reading a JSON request body so that no body can produce a 5xx.

* ``Content-Type`` must be JSON (``application/json`` or ``*/*+json``) when given: 415 otherwise,
  as vLLM answers. A missing header is accepted (some clients omit it).
* ``Content-Encoding``: aiohttp decodes gzip and deflate (and br / zstd when their libraries are
  installed); a body that does not decode is a 400, an unknown coding a 415.
* The size limit (413) applies to the decoded body, and reading it may take at most
  ``timeout_s`` (408): a client trickling its body does not hold a handler forever.
* JSON nested deeper than :data:`MAX_JSON_DEPTH` is a 400 (the parser itself raises
  RecursionError near depth 1,000, and code walking the value later could recurse too); so is
  an integer literal of more than 4,300 digits (Python refuses to parse it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from tokencake.server.errors import APIError, bad

MAX_JSON_DEPTH = 64
# Codings aiohttp decodes itself; "identity" means none.
_CODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate", "br", "zstd"})


def _json_content_type(ctype: str) -> bool:
    return ctype == "application/json" or (
        ctype.startswith("application/") and ctype.endswith("+json")
    )


async def read_json(request: web.Request, max_bytes: int, timeout_s: float) -> Any:
    """The request's JSON body; every refusal is an :class:`APIError` (4xx)."""
    if "Content-Type" in request.headers and not _json_content_type(request.content_type):
        raise APIError(
            415, f"Content-Type must be application/json, got {request.content_type[:100]!r}",
            None, code="unsupported_media_type",
        )  # fmt: skip
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in _CODINGS:
        raise APIError(415, f"unsupported Content-Encoding {coding[:50]!r}", None,
                       code="unsupported_content_encoding")  # fmt: skip
    if request.content_length is not None and request.content_length > max_bytes:
        raise APIError(413, f"request body exceeds the {max_bytes} byte limit", None)
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except TimeoutError:
        raise APIError(408, f"the request body was not received within {timeout_s:g} s", None,
                       code="body_timeout") from None  # fmt: skip
    except RequestPayloadError as exc:
        raise bad(f"the request body could not be read: {str(exc).strip()[:200]}", None) from None
    try:
        value = json.loads(raw)
    except RecursionError:
        raise bad(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None) from None
    except (ValueError, UnicodeDecodeError):
        raise bad("request body is not valid JSON", None) from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise bad(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None)
    return value


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion); stops counting once
    past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
