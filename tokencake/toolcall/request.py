"""One request's tool-calling side, parsed once: tools, choice, history, and what follows
from them (the output parser, the forced-call schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokencake.toolcall.constraints import forced_call_grammar
from tokencake.toolcall.messages import ChatMessage, ToolHistory, parse_messages
from tokencake.toolcall.parser import ToolCallParser
from tokencake.toolcall.render import TemplateInfo
from tokencake.toolcall.types import (
    InvalidToolRequest,
    ToolChoice,
    ToolSpec,
    parse_tool_choice,
    parse_tools,
)


@dataclass(frozen=True)
class ToolRequest:
    """The tool-calling fields of a chat request and its conversation's tool history.

    ``history`` tells which call ids the conversation made (with their function names) and which
    it answers with ``tool`` messages: the tool-call lifecycle can be read off it (issue 14).
    ``constrained`` is set when the server forces the call through the grammar (``required`` /
    named, see :mod:`tokencake.toolcall.constraints`); the output is then Hermes-format.
    """

    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    choice: ToolChoice = ToolChoice("none")
    parallel: bool = True
    history: ToolHistory = ToolHistory()
    constrained: bool = False

    @property
    def call_ids(self) -> tuple[str, ...]:
        """Every tool-call id the conversation's assistant turns made, in order."""
        return tuple(self.history.calls)

    @property
    def result_ids(self) -> tuple[str, ...]:
        """The call ids this request answers with ``tool`` messages."""
        return self.history.results

    def grammar(self) -> Any:
        """The grammar spec that forces the call (``required`` / named), else ``None``."""
        return (
            forced_call_grammar(self.tools, self.choice, self.parallel)
            if self.constrained
            else None
        )

    def output_parser(self, info: TemplateInfo) -> ToolCallParser | None:
        """A fresh parser for this request's output, or ``None`` when calls are not parsed."""
        if not self.tools or not self.choice.parses_calls:
            return None
        fmt = "hermes" if self.constrained else info.format  # the grammar writes Hermes blocks
        return ToolCallParser(fmt, (t.name for t in self.tools), info.id_style)


def parse_tool_request(
    messages: Any,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: Any = None,
    *,
    flat_tools: bool = False,
    constrained: bool = False,
) -> ToolRequest:
    """Validate the tool-calling fields of a request (Chat Completions shapes; ``flat_tools``
    for the Responses API's). Raises :class:`InvalidToolRequest` naming the field."""
    msgs, history = parse_messages(messages)
    specs = parse_tools(tools, flat=flat_tools)
    choice = parse_tool_choice(tool_choice, specs, flat=flat_tools)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidToolRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return ToolRequest(
        messages=tuple(msgs),
        tools=specs,
        choice=choice,
        parallel=parallel_tool_calls is not False,
        history=history,
        constrained=constrained and choice.forced,
    )
