"""An incremental scanner over one JSON call object ``{"name": ..., "arguments": {...}}``.

Fed one character at a time, it reports the function name as soon as its string closes and the
characters of the arguments value as they arrive, so a streaming parser can forward argument
chunks without waiting for the object to end. It tracks just enough JSON (strings, escapes,
nesting) to know where the top-level keys and values are; :meth:`CallScanner.result` validates
the whole object with :func:`json.loads` at the end.
"""

from __future__ import annotations

import json
from typing import Any

ARG_KEYS = ("arguments", "parameters")  # Hermes/Mistral say arguments, Llama 3 parameters


class CallScanner:
    """Scans one call object. ``feed`` returns ``(kind, text)`` items: ``("name", name)`` once,
    ``("args", chunk)`` for argument text; :attr:`done` turns true at the closing brace and
    :attr:`failed` when the text cannot be a call object."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.done = False
        self.failed = False
        self._depth = 0  # 0 before "{", 1 inside the call object
        self._phase = "key"  # key | colon | value_start | value | after
        self._in_str = False
        self._esc = False
        self._key: list[str] = []
        self._cur_key: str | None = None
        self._vdepth = 0  # nesting inside the current value
        self._val: list[str] = []
        self._args_is_str = False
        self.name: str | None = None
        self.saw_args = False
        self.args_raw = ""  # the arguments value's text (decoded when double-encoded)

    # ---------------------------------------------------------------- feeding
    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for ch in text:
            if self.done or self.failed:
                break
            self.raw.append(ch)
            self._char(ch, out)
        return out

    def _is_args(self) -> bool:
        return self._cur_key in ARG_KEYS

    def _char(self, ch: str, out: list[tuple[str, str]]) -> None:
        if self._depth == 0:
            if ch == "{":
                self._depth = 1
            elif not ch.isspace():
                self.failed = True
            return
        if self._in_str:
            self._string_char(ch, out)
            return
        phase = self._phase
        if phase == "key":
            if ch == '"':
                self._in_str, self._key = True, ['"']
            elif ch == "}":
                self.done = True
            elif not (ch.isspace() or ch == ","):
                self.failed = True
        elif phase == "colon":
            if ch == ":":
                self._phase = "value_start"
            elif not ch.isspace():
                self.failed = True
        elif phase == "value_start":
            if ch.isspace():
                return
            self._phase, self._val, self._vdepth = "value", [], 0
            self._args_is_str = self._is_args() and ch == '"'
            if self._is_args():
                self.saw_args = True
            self._value_char(ch, out)
        elif phase == "value":
            self._value_char(ch, out)
        elif phase == "after":
            if ch == ",":
                self._phase = "key"
            elif ch == "}":
                self.done = True
            elif not ch.isspace():
                self.failed = True

    def _string_char(self, ch: str, out: list[tuple[str, str]]) -> None:
        closed = False
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            self._in_str = False
            closed = True
        if self._phase == "key":
            self._key.append(ch)
            if closed:
                try:
                    self._cur_key = json.loads("".join(self._key))
                except ValueError:
                    self.failed = True
                self._phase = "colon"
            return
        # inside a value
        self._val.append(ch)
        if self._is_args() and not self._args_is_str:
            out.append(("args", ch))
        if closed and self._vdepth == 0:
            self._end_value(out)

    def _value_char(self, ch: str, out: list[tuple[str, str]]) -> None:
        if ch in "}]" and self._vdepth == 0:  # a scalar value ended by the object's close
            self._end_value(out)
            self._phase = "after"
            self._char(ch, out)
            return
        if ch == "," and self._vdepth == 0:
            self._end_value(out)
            self._phase = "key"
            return
        self._val.append(ch)
        if self._is_args() and not self._args_is_str:
            out.append(("args", ch))
        if ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._vdepth += 1
        elif ch in "}]":
            self._vdepth -= 1
            if self._vdepth == 0:
                self._end_value(out)

    def _end_value(self, out: list[tuple[str, str]]) -> None:
        self._phase = "after"
        raw = "".join(self._val).strip()
        if self._cur_key == "name" and self.name is None:
            try:
                name = json.loads(raw)
            except ValueError:
                name = None
            if isinstance(name, str) and name:
                self.name = name
                out.append(("name", name))
            else:
                self.failed = True
        elif self._is_args():
            self.args_raw = raw
            if self._args_is_str:
                # Some models double-encode: "arguments": "{\"a\": 1}". Forward the decoded text.
                try:
                    decoded = json.loads(raw)
                except ValueError:
                    decoded = raw
                self.args_raw = decoded if isinstance(decoded, str) else raw
                out.append(("args", self.args_raw))

    # ---------------------------------------------------------------- result
    def result(self) -> tuple[str, str] | None:
        """``(name, arguments JSON text)`` when the object is a well-formed call, else None."""
        if not self.done or self.failed:
            return None
        try:
            obj: Any = json.loads("".join(self.raw))
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        key = next((k for k in ARG_KEYS if k in obj), None)
        args = obj.get(key) if key else {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return obj["name"], self.args_text(args)

    def args_text(self, parsed: dict[str, Any]) -> str:
        """The arguments as streamed (the model's own spelling), else re-serialised."""
        return self.args_raw if self.args_raw.strip() else json.dumps(parsed)
