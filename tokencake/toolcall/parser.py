"""Tool calls in model output: the formats, an incremental parser and the one-shot parse.

Formats parsed (which one a model speaks is read off its chat template, :func:`detect_format`):

* ``hermes`` - ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them,
  text around them allowed (Qwen2.5, Hermes, and Tokencake's fallback prompt).
* ``mistral`` - ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` after optional text.
* ``llama3_json`` - the whole output is ``{"name": ..., "parameters": {...}}`` (several separated
  by ``;``), optionally after ``<|python_tag|>``.

Every format also accepts a bare call object at the very start of the output (for Mistral, a bare
array of them), provided its name is one of the request's tools: small models often drop the tags,
and markers that are special tokens (``<|python_tag|>``, ``[TOOL_CALLS]``) are removed when the
output is detokenized.

:class:`ToolCallParser` turns text deltas into events: :class:`TextDelta` (text that is certainly
not part of a call: a possible marker prefix is held back until it resolves), :class:`CallStart`,
:class:`ArgsDelta` and :class:`CallEnd`. :func:`parse_tool_calls` runs the same parser over a
whole text, so streamed and non-streamed results agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from tokencake.toolcall.scanner import CallScanner
from tokencake.toolcall.types import ToolCall, new_call_id

Format = Literal["hermes", "mistral", "llama3_json"]
FORMATS: tuple[Format, ...] = ("hermes", "mistral", "llama3_json")

_OPEN = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}
_HERMES_CLOSE = "</tool_call>"
_AFTER_CALL = {"hermes": "close", "mistral": "between", "llama3_json": "bare_sep"}


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    index: int


Event = TextDelta | CallStart | ArgsDelta | CallEnd


def detect_format(template: str | None) -> Format:
    """The tool-call format a chat template teaches its model (``hermes`` when unknown, which is
    also what the fallback prompt asks for)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or ('"parameters"' in t and "ipython" in t):
        return "llama3_json"
    return "hermes"


@dataclass
class _Call:
    index: int
    scanner: CallScanner = field(default_factory=CallScanner)
    id: str | None = None  # set once CallStart went out
    pending_args: list[str] = field(default_factory=list)  # args seen before the name
    streamed: list[str] = field(default_factory=list)


class ToolCallParser:
    """Incremental parser of one generation's text.

    ``tool_names`` are the request's tools (bare objects must name one); ``id_style`` picks the
    call-id spelling (``mistral`` templates demand 9 characters). ``start="calls"`` reads output
    that begins inside a Mistral call array (grammar-forced calls, see
    :mod:`tokencake.toolcall.constraints`).
    """

    def __init__(
        self,
        fmt: Format,
        tool_names: Iterable[str],
        id_style: Literal["openai", "mistral"] = "openai",
        start: Literal["text", "calls"] = "text",
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS}")
        self.fmt = fmt
        self.names = frozenset(tool_names)
        self.id_style = id_style
        self._open = _OPEN[fmt]
        self._buf = ""  # unconsumed text
        # start | text | call | bare | bare_sep | close | between (the _st_* methods)
        self._state = "start" if start == "text" else "between"
        if start == "calls" and fmt != "mistral":
            raise ValueError("start='calls' reads the Mistral array shape only")
        self._call: _Call | None = None
        self._ws = ""  # trailing whitespace of content, held until more content follows
        self._bare_held = ""  # raw text of an unconfirmed bare object (content if it fails)
        self.calls: list[ToolCall] = []
        self.malformed = False  # some call was cut off or invalid JSON
        self.content = ""  # text emitted as content
        self._n = 0

    # ------------------------------------------------------------------ public
    def feed(self, text: str) -> list[Event]:
        """Consume a text delta; returns the events it completes."""
        out: list[Event] = []
        self._buf += text
        self._run(out, final=False)
        return out

    def finish(self) -> list[Event]:
        """End of generation: flush held text and close an unterminated call."""
        out: list[Event] = []
        self._run(out, final=True)
        call = self._call
        if call is not None:
            if self._state == "bare" and call.id is None:
                self._emit_text(self._bare_held, out)
            else:
                self._close_call(out)
            self._call = None
        if self._buf:
            self._emit_text(self._buf, out)
            self._buf = ""
        if self._ws and not self.calls and not self.malformed:
            out.append(TextDelta(self._ws))
            self.content += self._ws
        self._ws = ""
        return out

    # ------------------------------------------------------------------ machinery
    def _run(self, out: list[Event], final: bool) -> None:
        while self._buf:
            before = (self._state, len(self._buf))
            getattr(self, "_st_" + self._state)(out, final)
            if (self._state, len(self._buf)) == before:
                return  # needs more text

    def _st_start(self, out: list[Event], final: bool) -> None:
        s = self._buf.lstrip()
        if not s:
            if final:
                self._state = "text"
            return
        tag = _OPEN["llama3_json"]
        if self.fmt == "llama3_json" and tag.startswith(s[: len(tag)]):
            if s.startswith(tag):  # an explicit call: no name check needed
                self._buf, self._state = s[len(tag) :], "bare_sep"
                return
            if not final:
                return  # may still become <|python_tag|>
        lead = self._buf[: len(self._buf) - len(s)]
        if self.names and self.fmt == "mistral" and s[0] == "[":
            # [TOOL_CALLS] is a control token that detokenization drops: the array remains.
            rest = s[1:].lstrip()
            if not rest and not final:
                return
            if rest.startswith("{"):
                self._bare_held = lead + s[: len(s) - len(rest)]
                self._buf, self._state, self._call = rest, "bare", _Call(self._n)
                return
        if self.names and s[0] == "{":
            self._bare_held = lead
            self._buf, self._state, self._call = s, "bare", _Call(self._n)
            return
        self._state = "text"

    def _st_text(self, out: list[Event], final: bool) -> None:
        marker = self._open if self.fmt != "llama3_json" else None
        if marker is None:
            self._emit_text(self._buf, out)
            self._buf = ""
            return
        i = self._buf.find(marker)
        if i >= 0:
            self._emit_text(self._buf[:i], out)
            self._buf = self._buf[i + len(marker) :]
            self._state = "call" if self.fmt == "hermes" else "between"
            self._call = _Call(self._n) if self.fmt == "hermes" else None
            return
        keep = 0 if final else _partial_suffix(self._buf, marker)
        self._emit_text(self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep :]

    def _st_call(self, out: list[Event], final: bool) -> None:
        assert self._call is not None
        call = self._call
        n_raw = len(call.scanner.raw)
        items = call.scanner.feed(self._buf)
        used = len(call.scanner.raw) - n_raw
        self._buf = self._buf[used:]
        self._forward(call, items, out)
        if call.scanner.failed:
            self.malformed = True
            self._close_call(out)
            self._call = None
            self._state = "text"
        elif call.scanner.done:
            self._close_call(out)
            self._call = None
            self._state = _AFTER_CALL[self.fmt]

    def _st_bare(self, out: list[Event], final: bool) -> None:
        assert self._call is not None
        call = self._call
        n_raw = len(call.scanner.raw)
        items = call.scanner.feed(self._buf)
        used = len(call.scanner.raw) - n_raw
        if call.id is None:
            self._bare_held += self._buf[:used]
        self._buf = self._buf[used:]
        sc = call.scanner
        if call.id is None and (sc.failed or (sc.name is not None and sc.name not in self.names)):
            # Not a call after all: everything held is ordinary content.
            self._emit_text(self._bare_held + self._buf, out)
            self._buf, self._bare_held, self._call = "", "", None
            self._state = "text"
            return
        self._forward(call, items, out)
        if sc.failed:
            self.malformed = True
            self._close_call(out)
            self._call, self._state = None, "text"
        elif sc.done:
            if call.id is None:  # complete object without a usable name: content
                self._emit_text(self._bare_held, out)
                self._call, self._state = None, "text"
                return
            self._close_call(out)
            self._call, self._state = None, "between" if self.fmt == "mistral" else "bare_sep"

    def _st_bare_sep(self, out: list[Event], final: bool) -> None:
        # After a bare (or <|python_tag|>) call: more calls separated by ";", else text.
        s = self._buf.lstrip()
        if not s:
            self._buf = ""
        elif s[0] == ";":
            self._buf = s[1:]
        elif s[0] == "{":
            self._buf, self._state, self._call = s, "call", _Call(self._n)
        else:
            self._buf, self._state = s, "text"

    def _st_close(self, out: list[Event], final: bool) -> None:
        s = self._buf.lstrip()
        if not s:
            self._buf = ""
            return
        if s.startswith(_HERMES_CLOSE):
            self._buf = s[len(_HERMES_CLOSE) :]
            self._state = "text"
        elif _HERMES_CLOSE.startswith(s) and not final:
            self._buf = s  # wait for the rest of the closing tag
        else:
            self._buf = s  # a missing close tag: carry on with text
            self._state = "text"

    def _st_between(self, out: list[Event], final: bool) -> None:
        # Mistral: after [TOOL_CALLS], between objects of the array, and after it.
        s = self._buf.lstrip()
        if not s:
            self._buf = ""
            return
        if s[0] in "[,":
            self._buf = s[1:]
            return
        if s[0] == "{":
            self._buf, self._state, self._call = s, "call", _Call(self._n)
            return
        if s[0] == "]":
            s = s[1:]
        self._buf = s
        self._state = "text"

    # ------------------------------------------------------------------ events
    def _forward(self, call: _Call, items: list[tuple[str, str]], out: list[Event]) -> None:
        args: list[str] = []  # consecutive argument characters go out as one delta
        for kind, text in items:
            if kind == "name":
                if call.id is None:
                    call.pending_args += args
                    args = []
                    self._start(call, text, out)
            elif call.id is None:
                call.pending_args.append(text)
            else:
                args.append(text)
        if args:
            self._args(call, "".join(args), out)

    def _start(self, call: _Call, name: str, out: list[Event]) -> None:
        call.id = new_call_id(self.id_style)
        self._n += 1
        out.append(CallStart(call.index, call.id, name))
        pending, call.pending_args = call.pending_args, []
        self._args(call, "".join(pending), out)

    def _args(self, call: _Call, text: str, out: list[Event]) -> None:
        if text:
            call.streamed.append(text)
            out.append(ArgsDelta(call.index, text))

    def _close_call(self, out: list[Event]) -> None:
        call = self._call
        if call is None:
            return
        res = call.scanner.result()
        if res is None:
            self.malformed = True
        if call.id is None:
            return
        if res is not None and not call.streamed:
            self._args(call, res[1], out)  # a call without arguments streams "{}"
        out.append(CallEnd(call.index))
        if res is not None:
            self.calls.append(ToolCall(call.id, res[0], "".join(call.streamed)))

    def _emit_text(self, text: str, out: list[Event]) -> None:
        if not self.content and (self.calls or self._call is not None):
            # Whitespace around calls is layout, not content: drop it until real text comes.
            text = text.lstrip()
            self._ws = ""
        body = text.rstrip()
        if body:
            piece = self._ws + body
            self._ws = ""
            out.append(TextDelta(piece))
            self.content += piece
        self._ws += text[len(body) :]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


@dataclass(frozen=True)
class ParsedOutput:
    """A finished generation split into content and calls."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]


def parse_tool_calls(
    text: str,
    fmt: Format,
    tool_names: Iterable[str],
    id_style: Literal["openai", "mistral"] = "openai",
) -> ParsedOutput:
    """Parse a whole generation. Without a well-formed call the text stays content, untouched
    (the client sees what the model wrote); a broken call after complete ones (cut off by
    ``max_tokens``) is dropped, the complete ones stand."""
    p = ToolCallParser(fmt, tool_names, id_style)
    p.feed(text)
    p.finish()
    if not p.calls:
        return ParsedOutput(text, ())
    return ParsedOutput(p.content or None, tuple(p.calls))
