"""The request protocol: JSON bodies parsed into typed requests, in one place.

Every failure is an :class:`APIError` (400 unless stated) or a
:class:`~tokencake.fieldpolicy.InvalidField` (400) that names the offending field.
``null`` counts as absent, as OpenAI clients treat it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokencake.fieldpolicy import unknown_fields
from tokencake.responses_api import ResponsesRequest
from tokencake.sampling_params import MAX_LOGPROBS, MAX_N
from tokencake.scheduler.errors import RequestRejected
from tokencake.scheduler.lifecycle import LifecycleEvent
from tokencake.scheduler.metadata import AgentMetadata
from tokencake.server.errors import APIError, bad, rejection_error
from tokencake.toolcall import ToolCall, ToolRequest, parse_tool_request, response_format_spec
from tokencake.toolcall.render import TemplateInfo

MAX_STOP_SEQUENCES = 16


def _shown(v: int | float) -> str:
    """A number for an error message (never hundreds of digits)."""
    if isinstance(v, int) and not -(10**30) < v < 10**30:
        return f"an integer of {len(str(abs(v)))} digits"
    return repr(v)


class Fields:
    """Typed access to a JSON object's fields; every failure is a 400 naming the field.

    ``null`` counts as absent, as OpenAI clients treat it.
    """

    def __init__(
        self, body: Any, allowed: frozenset[str], prefix: str = "", lenient: bool = False
    ) -> None:
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object", prefix.rstrip(".") or None)
        # One policy (tokencake.fieldpolicy): refuse, listing every unknown field, or ignore.
        unknown_fields(body, allowed, lenient=lenient, prefix=prefix)
        self.body = body
        self.prefix = prefix
        self.lenient = lenient

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def integer(
        self, name: str, lo: int | None = None, hi: int | None = None, default: int | None = None
    ) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():  # JSON writers may emit 16.0
                v = int(v)
            else:
                raise bad(f"{self.prefix}{name} must be an integer", self.prefix + name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(
                f"{self.prefix}{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {_shown(v)}",
                self.prefix + name,
            )
        return v

    def number(
        self, name: str, lo: float, hi: float, default: float | None, lo_open: bool = False
    ) -> float | None:
        v = self.body.get(name)
        if v is None:
            return default
        # An int is compared exactly before any float conversion: math.isfinite(10**400)
        # raises OverflowError, which would have been a 500.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"{self.prefix}{name} must be a number", self.prefix + name)
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"{self.prefix}{name} must be a finite number", self.prefix + name)
        if v > hi or v < lo or (lo_open and v == lo):
            span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise bad(f"{self.prefix}{name} must be in {span}, got {_shown(v)}", self.prefix + name)
        return float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad(f"{self.prefix}{name} must be a boolean", self.prefix + name)
        return v

    def string(self, name: str, default: str | None = None) -> str | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad(f"{self.prefix}{name} must be a string", self.prefix + name)
        return v

    def obj(self, name: str) -> dict[str, Any] | None:
        v = self.body.get(name)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise bad(f"{self.prefix}{name} must be an object", self.prefix + name)
        return v

    def neutral(self, name: str, neutral: tuple[Any, ...]) -> None:
        """Accept a field only at a value that changes nothing (unsupported features)."""
        v = self.body.get(name)
        # bool is an int in Python: keep True from passing for 1 and False for 0.
        if v is not None and not any(
            v == n and isinstance(v, bool) == isinstance(n, bool) for n in neutral
        ):
            raise bad(f"{self.prefix}{name}={v!r} is not supported", self.prefix + name)


# Sent by OpenAI-ecosystem clients; accepted and ignored (nothing to do for a local model).
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "reasoning_effort", "service_tier", "verbosity",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
})  # fmt: skip
_COMMON_FIELDS = IGNORED_FIELDS | {
    "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "stop", "stop_token_ids", "seed", "ignore_eos", "include_stop_str_in_output",
    "presence_penalty", "frequency_penalty", "logit_bias", "tokencake", "vllm_xargs", "request_id",
    "repetition_penalty", "min_p",
}  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
    "add_generation_prompt", "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip


@dataclass
class GenerationRequest:
    """A validated generation request, before tokenization."""

    request_id: str
    stream: bool
    include_usage: bool
    params: dict[str, Any]  # SamplingParams kwargs except max_tokens
    max_tokens: int | None
    max_tokens_param: str
    metadata: AgentMetadata | None
    chat: bool
    metadata_param: str = "tokencake"
    chat_logprobs: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    # chat only: tools, tool choice and the conversation's tool history (issue 14 keys on it)
    tool_request: ToolRequest | None = None
    structured: Any = None  # a tokencake.structured spec (response_format or a forced call)
    structured_param: str = "response_format"  # ... or "tools" when the grammar forces a call
    template: TemplateInfo | None = None  # set at tokenization: the model template's tool format
    responses: ResponsesRequest | None = None  # set when the request came to /v1/responses
    # The tool-call lifecycle (tokencake.server.lifecycles): the client's `user` and lifecycle
    # id, the ticket that opens the record, what the response carries about it, and the hook
    # the response writers call with the tool calls they sent.
    user: str | None = None
    lifecycle_handle: str | None = None
    ticket: Any = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response_extra: dict[str, Any] = field(default_factory=dict)
    on_done: Callable[[list[ToolCall]], Awaitable[None]] | None = None

    @property
    def wire_names(self) -> dict[str, str]:
        """How this request spells the engine's parameter names (see ``RequestRejected``)."""
        return {
            "prompt": "input" if self.responses else "messages" if self.chat else "prompt",
            # a grammar that does not compile: the field the client constrained decoding with
            "structured": self.structured_param,
            "max_tokens": self.max_tokens_param,
            "metadata": self.metadata_param,
        }


def _parse_common(f: Fields, chat: bool, model_name: str) -> GenerationRequest:
    model = f.string("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {model_name!r}",
            "model",
            code="model_not_found",
        )
    n = f.integer("n", 1, MAX_N, default=1)
    user = f.string("user")
    stream = f.boolean("stream")
    include_usage = False
    opts = f.obj("stream_options")
    if opts is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        include_usage = Fields(
            opts,
            frozenset({"include_usage", "continuous_usage_stats"}),
            "stream_options.",
            f.lenient,
        ).boolean("include_usage")
    stop = f.raw("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad(f"stop allows at most {MAX_STOP_SEQUENCES} sequences", "stop")
    stop_ids = f.raw("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids
    ):
        raise bad("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
    seed = f.integer("seed")
    params: dict[str, Any] = {
        # None = omitted: the model's own default applies (with_sampling_defaults).
        "temperature": f.number("temperature", 0.0, 2.0, None),
        "top_p": f.number("top_p", 0.0, 1.0, None, lo_open=True),
        "top_k": _top_k(f),
        # OpenAI seeds are 64-bit; the engine's are 31-bit, so fold (deterministically).
        "seed": None if seed is None else seed % 2**31,
        "stop": tuple(stop),
        "stop_token_ids": tuple(stop_ids),
        "ignore_eos": f.boolean("ignore_eos"),
        "include_stop_str_in_output": f.boolean("include_stop_str_in_output"),
        # logit controls, applied inside the jitted step (SamplingParams validates the bias map)
        "presence_penalty": f.number("presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": f.number("frequency_penalty", -2.0, 2.0, 0.0),
        "repetition_penalty": f.number("repetition_penalty", 0.0, 10.0, 1.0, lo_open=True),
        "min_p": f.number("min_p", 0.0, 1.0, 0.0),
        "logit_bias": f.raw("logit_bias"),
        "n": n,
    }
    if chat:
        mt_param = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    else:
        mt_param = "max_tokens"
    max_tokens = f.integer(mt_param, 1)
    metadata, meta_id, meta_param = _parse_metadata(f)
    request_id = f.string("request_id")
    if request_id is not None and not (0 < len(request_id) <= 128):
        raise bad("request_id must be 1-128 characters", "request_id")
    # The lifecycle id names the conversation's lifecycle (reusable once its request ended);
    # each request gets its own id.
    rid = request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    p = GenerationRequest(
        rid, stream, include_usage, params, max_tokens, mt_param, metadata, chat, meta_param
    )
    p.user, p.lifecycle_handle = user, meta_id
    return p


def _top_k(f: Fields) -> int | None:
    k = f.integer("top_k", -1)
    return 0 if k == -1 else k  # vLLM spells "disabled" as -1


# What a request that omits a sampling field gets when the model recommends nothing (OpenAI's).
API_SAMPLING_DEFAULTS: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def with_sampling_defaults(
    params: dict[str, Any], model_defaults: Mapping[str, float | int]
) -> dict[str, Any]:
    """``params`` with each omitted (None) temperature / top_p / top_k taken from the model's
    own generation settings, else from the API's defaults; explicit values always win."""
    out = dict(params)
    for key, api_default in API_SAMPLING_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = model_defaults.get(key, api_default)
    return out


def _parse_metadata(f: Fields) -> tuple[AgentMetadata | None, str | None, str]:
    """Agent metadata from ``tokencake`` or ``vllm_xargs.tokencake`` (the authors' client):
    (metadata, its lifecycle id, the field it came in)."""
    direct = f.raw("tokencake")
    param = "tokencake"
    xargs = f.raw("vllm_xargs")
    if xargs is not None:
        xf = Fields(xargs, frozenset({"tokencake"}), "vllm_xargs.", f.lenient)
        if xf.has("tokencake"):
            if direct is not None:
                raise bad(
                    "give agent metadata in tokencake or vllm_xargs.tokencake, not both",
                    "vllm_xargs.tokencake",
                )
            direct, param = xf.raw("tokencake"), "vllm_xargs.tokencake"
    if direct is None:
        return None, None, param
    if isinstance(direct, str):  # vllm_xargs values are sometimes JSON-encoded strings
        try:
            direct = json.loads(direct)
        except (ValueError, RecursionError):  # RecursionError: nested ~1,000 deep
            raise bad(f"{param} must be a JSON object", param) from None
    if not isinstance(direct, dict):
        raise bad(f"{param} must be an object", param)
    lifecycle_id = direct.get("lifecycle_id")
    if lifecycle_id is not None and not isinstance(lifecycle_id, str):
        raise bad(f"{param}.lifecycle_id must be a string", f"{param}.lifecycle_id")
    try:
        # Over HTTP the wire format is enforced: lifecycle_id = "tc-" + UUID4 hex (paper §8.1).
        return AgentMetadata.from_dict(direct, strict_lifecycle_id=True), lifecycle_id, param
    except RequestRejected as exc:
        raise rejection_error(exc, {"metadata": param}) from None


def parse_completion(body: Any, model_name: str, lenient: bool = False) -> GenerationRequest:
    f = Fields(body, _COMPLETION_FIELDS, lenient=lenient)
    p = _parse_common(f, chat=False, model_name=model_name)
    f.neutral("echo", (False,))
    f.neutral("best_of", (1,))
    f.neutral("suffix", ("",))
    lp = f.integer("logprobs", 0, MAX_LOGPROBS)
    p.params["logprobs"] = lp
    prompt = f.raw("prompt")
    if prompt is None:
        raise bad("prompt is required", "prompt")
    # One prompt only: a string, a token list, or a batch of exactly one of those.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, (str, list)) for t in prompt):
        raise bad("only one prompt per request is supported", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt must not be empty", "prompt")
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("prompt must be a string or a non-empty list of token ids", "prompt")
    else:
        raise bad("prompt must be a string or a list of token ids", "prompt")
    p.prompt = prompt
    return p


def parse_chat(body: Any, model_name: str, lenient: bool = False) -> GenerationRequest:
    f = Fields(body, _CHAT_FIELDS, lenient=lenient)
    p = _parse_common(f, chat=True, model_name=model_name)
    p.chat_logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not p.chat_logprobs:
        raise bad("top_logprobs requires logprobs=true", "top_logprobs")
    p.params["logprobs"] = (top or 0) if p.chat_logprobs else None
    p.add_generation_prompt = f.boolean("add_generation_prompt", True)
    fmt = f.raw("response_format")
    # tool_choice required / named are forced through the grammar (tokencake.toolcall.constraints)
    tr = parse_tool_request(
        f.raw("messages"),
        f.raw("tools"),
        f.raw("tool_choice"),
        f.raw("parallel_tool_calls"),
        constrained=True,
    )
    structured = response_format_spec(fmt)
    if tr.constrained:
        if structured is not None:
            raise bad(
                "response_format cannot be combined with a forced tool_choice", "response_format"
            )
        structured = tr.grammar()
        p.structured_param = "tools"
    if structured is not None and p.params["ignore_eos"]:
        raise bad("ignore_eos cannot be combined with structured output", "ignore_eos")
    p.tool_request = tr
    p.structured = structured
    p.messages = [{"role": m.role, "content": m.content} for m in tr.messages]
    return p


def parse_event(body: Any) -> LifecycleEvent:
    """A ``/v1/tokencake/events`` body (paper §8.2); a bad field is a 400 naming it."""
    return LifecycleEvent.parse(body)
