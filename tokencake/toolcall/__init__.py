"""OpenAI-compatible tool calling: request shapes, prompt rendering, output parsing.

* :mod:`~tokencake.toolcall.types` - tools, tool choice, calls (parsed and validated);
* :mod:`~tokencake.toolcall.messages` - chat histories with ``tool_calls`` / ``tool`` messages;
* :mod:`~tokencake.toolcall.render` - through the model's chat template, or the fallback prompt;
* :mod:`~tokencake.toolcall.parser` - Hermes / Mistral / Llama 3 JSON output, incrementally;
* :mod:`~tokencake.toolcall.constraints` - forced calls and ``response_format`` as grammars;
* :mod:`~tokencake.toolcall.request` - one request's tool side, parsed once.
"""

from __future__ import annotations

from tokencake.toolcall.constraints import forced_call_grammar, response_format_spec
from tokencake.toolcall.messages import ChatMessage, ToolHistory, parse_messages
from tokencake.toolcall.parser import (
    ArgsDelta,
    CallEnd,
    CallStart,
    Event,
    ParsedOutput,
    TextDelta,
    ToolCallParser,
    detect_format,
    parse_tool_calls,
)
from tokencake.toolcall.render import TemplateInfo, render_prompt, template_info
from tokencake.toolcall.request import ToolRequest, parse_tool_request
from tokencake.toolcall.types import (
    InvalidToolRequest,
    ToolCall,
    ToolChoice,
    ToolSpec,
    new_call_id,
    parse_tool_choice,
    parse_tools,
)

__all__ = [
    "ArgsDelta",
    "CallEnd",
    "CallStart",
    "ChatMessage",
    "Event",
    "InvalidToolRequest",
    "ParsedOutput",
    "TemplateInfo",
    "TextDelta",
    "ToolCall",
    "ToolCallParser",
    "ToolChoice",
    "ToolHistory",
    "ToolRequest",
    "ToolSpec",
    "detect_format",
    "forced_call_grammar",
    "new_call_id",
    "parse_messages",
    "parse_tool_calls",
    "parse_tool_choice",
    "parse_tool_request",
    "parse_tools",
    "render_prompt",
    "response_format_spec",
    "template_info",
]
