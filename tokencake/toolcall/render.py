"""Prompt rendering for tool-calling conversations.

When the model's own chat template knows tools (it reads a ``tools`` variable, as the Qwen2.5,
Llama 3.1+, Mistral and Hermes templates do), the conversation goes through it unchanged in
meaning: ``tools`` are passed to the template, assistant ``tool_calls`` keep their structure
(arguments as objects, which these templates serialise with ``tojson``) and ``tool`` messages
keep ``tool_call_id`` and gain the called function's ``name`` (Hermes templates require it).

Otherwise (e.g. SmolLM2's template) the **fallback prompt** is used: the tool list and the
Hermes call format are described in the system message (appended to the client's system message,
or a new one), earlier calls are written into the assistant turn as ``<tool_call>`` blocks, and
tool results become a user turn of ``<tool_response>`` blocks (consecutive results merged, so
templates that insist on alternating roles still render). The output is then parsed as Hermes.

With ``tool_choice: "none"`` the tools are left out of the prompt (the model is not to call any,
and its output is not parsed for calls); the history's calls and results are still rendered.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from tokencake.toolcall.messages import ChatMessage
from tokencake.toolcall.parser import Format, detect_format
from tokencake.toolcall.types import ToolChoice, ToolSpec

IdStyle = Literal["openai", "mistral"]
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TemplateInfo:
    """What a chat template can do with tools."""

    supports_tools: bool  # reads a ``tools`` variable
    format: Format  # the call format its model emits (Hermes for the fallback prompt)
    id_style: IdStyle  # Mistral templates demand 9-character alphanumeric call ids


@functools.lru_cache(maxsize=8)
def template_info(template: str | None) -> TemplateInfo:
    """Inspect a Jinja chat template (cached: one per served model)."""
    if not template:
        return TemplateInfo(False, "hermes", "openai")
    import jinja2
    from jinja2 import meta

    try:
        names = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        names = set()
    supports = bool({"tools", "custom_tools"} & names)
    fmt = detect_format(template) if supports else "hermes"
    return TemplateInfo(supports, fmt, "mistral" if fmt == "mistral" else "openai")


def fallback_tools_prompt(tools: tuple[ToolSpec, ...], choice: ToolChoice) -> str:
    """The system-prompt block that teaches a template-less model the Hermes call format."""
    lines = [
        "You can call functions to help with the user's request. The available functions are "
        "listed between <tools> and </tools>, one JSON object per line:",
        "<tools>",
        *(json.dumps(t.openai(), ensure_ascii=False) for t in tools),
        "</tools>",
        "To call a function, answer with one block per call in exactly this form:",
        "<tool_call>",
        '{"name": "<function name>", "arguments": <arguments as a JSON object>}',
        "</tool_call>",
        "When a function's result arrives between <tool_response> and </tool_response>, use it "
        "to answer.",
    ]
    if choice.mode == "required":
        lines.append("You must call at least one function now.")
    elif choice.mode == "function":
        lines.append(f"You must call the function {choice.name} now.")
    return "\n".join(lines)


def _mistral_id(call_id: str) -> str:
    """A stable 9-character alphanumeric stand-in for any client call id."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_B62[(n // 62**k) % 62] for k in range(9))


def _args_obj(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # keep what the client sent; the template prints it as a string


def template_messages(
    messages: list[ChatMessage],
    tools: tuple[ToolSpec, ...],
    choice: ToolChoice,
    info: TemplateInfo,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and ``tools`` to hand the chat template (native or fallback form)."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    if info.supports_tools:
        offered = [t.openai() for t in tools] if choice.mode != "none" else []
        return _native(messages, names, info), offered or None
    return _fallback(messages, tools, choice), None


def _native(
    messages: list[ChatMessage], names: dict[str, str], info: TemplateInfo
) -> list[dict[str, Any]]:
    fix = _mistral_id if info.id_style == "mistral" else (lambda s: s)
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        d["content"] = m.content
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": fix(c.id),
                    "type": "function",
                    "function": {"name": c.name, "arguments": _args_obj(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.role == "tool":
            assert m.tool_call_id is not None
            d["tool_call_id"] = fix(m.tool_call_id)
            d["name"] = m.name or names.get(m.tool_call_id, "")
        elif m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def _call_block(name: str, arguments: str) -> str:
    args = arguments.strip() or "{}"
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'


def _fallback(
    messages: list[ChatMessage], tools: tuple[ToolSpec, ...], choice: ToolChoice
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        content = m.content
        if m.tool_calls:
            blocks = "\n".join(_call_block(c.name, c.arguments) for c in m.tool_calls)
            content = f"{content}\n{blocks}" if content else blocks
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    for d in out:
        d.pop("_tool_results", None)
    if tools and choice.mode != "none":
        block = fallback_tools_prompt(tools, choice)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def render_prompt(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: tuple[ToolSpec, ...] = (),
    choice: ToolChoice | None = None,
    add_generation_prompt: bool = True,
) -> tuple[str, TemplateInfo]:
    """The prompt text of a (tool-calling) conversation and what the template can do.

    ``tokenizer`` is a :class:`tokencake.models.tokenizer.Tokenizer`.
    """
    choice = choice or ToolChoice("auto" if tools else "none")
    info = template_info(tokenizer.chat_template)
    msgs, tool_dicts = template_messages(messages, tools, choice, info)
    text = tokenizer.render_chat(
        msgs, add_generation_prompt=add_generation_prompt, tools=tool_dicts
    )
    return text, info
