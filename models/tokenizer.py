"""Tokenizer wrapper: encode/decode, chat templates and streaming detokenization.

Everything goes through a ``transformers`` fast tokenizer (a ``tokenizers.Tokenizer`` inside),
built either from a GGUF file's ``tokenizer.ggml.*`` metadata (no PyTorch needed, unlike
``AutoTokenizer(gguf_file=...)``), from a Hugging Face folder, or as a tiny byte-level tokenizer
for tests.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

EXTRA_FILE = "tokencake_tokenizer.json"

# GGUF token_type value of control (special) tokens.
_GGUF_CONTROL = 3

_TEST_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<pad>",
)
_TEST_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _fast_tokenizer_cls() -> Any:
    import transformers
    from transformers.utils import logging as hf_logging

    # transformers warns about missing torch and tokenizer-class guesses on every load; none of
    # it is actionable for a torch-free serving engine.
    hf_logging.set_verbosity_error()
    return transformers.PreTrainedTokenizerFast


class Tokenizer:
    """A fast tokenizer plus the model's stop tokens and chat template.

    Use :meth:`from_gguf`, :meth:`from_hf_folder` or :meth:`byte_level_for_tests` rather than
    the constructor. Safe to share between threads: encode, decode and chat rendering hold a
    lock (a ``transformers`` fast tokenizer mutates its Rust state on encode, which fails with
    "Already borrowed" when two threads meet; the server decodes logprob texts on its event loop
    while the engine thread detokenizes).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        eos_token_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.hf = hf_tokenizer
        self._lock = threading.RLock()
        if chat_template is not None:
            self.hf.chat_template = chat_template
        if eos_token_ids is None:
            eos = self.hf.eos_token_id
            eos_token_ids = () if eos is None else (eos,)
        self._eos = tuple(int(e) for e in eos_token_ids)

    # ------------------------------------------------------------------ properties
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a generation."""
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None``."""
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab plus added tokens)."""
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, if any."""
        return self.hf.chat_template

    def clone(self) -> Tokenizer:
        """An independent copy with its own lock: a thread that tokenizes long client text
        on its own copy never makes the engine thread's detokenizer wait for the lock."""
        with self._lock:
            hf = copy.deepcopy(self.hf)
        return Tokenizer(hf, self._eos)

    def backend_json(self) -> str:
        """The Rust tokenizer's JSON (padding and truncation off), taken under the lock, for
        libraries that build their own view of the vocabulary (the grammar compiler): they
        must never touch ``hf`` from another thread while this one encodes."""
        with self._lock:
            backend = copy.copy(self.hf.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry (special tokens included). Every token
        covers at most this many characters of text, so a text longer than
        ``n * max_token_chars`` cannot fit in ``n`` tokens: a bound checked before tokenizing."""
        with self._lock:
            pieces = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        return max([len(p) for p in pieces if p] + [1])

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the tokenizer's own
        post-processor (e.g. Llama's BOS; SmolLM2 adds nothing)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        with self._lock:
            return self.hf.decode(
                [int(i) for i in ids],
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template applied to ``messages``, as text.

        ``tools`` (OpenAI ``{"type": "function", "function": {...}}`` entries) are handed to
        templates that render them; see :mod:`tokencake.toolcall.render` for conversations with
        tool calls.
        """
        msgs = _check_messages(messages)
        if not self.hf.chat_template:
            raise ValueError("this tokenizer has no chat template")
        with self._lock:
            return self.hf.apply_chat_template(
                msgs, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template.

        ``messages`` is a list of ``{"role": str, "content": str}`` (OpenAI-style content part
        lists of ``{"type": "text", "text": ...}`` are joined). Malformed input raises
        ``ValueError``.
        """
        text = self.render_chat(messages, add_generation_prompt)
        # Templates write BOS/special tokens themselves, so don't let the post-processor add more.
        return self.encode(text, add_special_tokens=False)

    def incremental(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ persistence
    def save(self, dst: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (+ template) and our extras to
        ``dst`` so :meth:`from_hf_folder` can rebuild this tokenizer without the source model."""
        d = Path(dst)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(d))
        extra = {"eos_token_ids": list(self._eos), "chat_template": self.hf.chat_template}
        (d / EXTRA_FILE).write_text(json.dumps(extra, indent=1))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], reader: Any = None) -> Tokenizer:
        """Build the BPE tokenizer stored in a GGUF file (``tokenizer.ggml.model == "gpt2"``).

        ``reader`` may be an already-open ``gguf.GGUFReader`` of the file.
        """
        from tokencake.models.gguf_loader import field_value, open_gguf

        if reader is None:
            reader = open_gguf(path)
        kind = field_value(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {path} (only gpt2/BPE)")
        tokens: list[str] = field_value(reader, "tokenizer.ggml.tokens")
        merges: list[str] = field_value(reader, "tokenizer.ggml.merges") or []
        ttype = field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        tk = RawTokenizer(
            models.BPE(
                vocab={t: i for i, t in enumerate(tokens)},
                merges=[tuple(m.split(" ", 1)) for m in merges],
                fuse_unk=False,
            )
        )
        # GGUF tokens are already in GPT-2 byte-level spelling. Digits(individual) mirrors
        # llama.cpp's smollm/llama3-style pre-tokenizers (a no-op when no multi-digit tokens).
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, ttype, strict=True)
                if ty == _GGUF_CONTROL
            ]
        )

        def tok_str(key: str) -> str | None:
            i = field_value(reader, key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        eos_ids = [
            int(i)
            for k in ("eos_token_id", "eot_token_id")
            if (i := field_value(reader, f"tokenizer.ggml.{k}")) is not None
        ]
        hf = _fast_tokenizer_cls()(
            tokenizer_object=tk,
            bos_token=tok_str("tokenizer.ggml.bos_token_id"),
            eos_token=tok_str("tokenizer.ggml.eos_token_id"),
            unk_token=tok_str("tokenizer.ggml.unknown_token_id"),
            pad_token=tok_str("tokenizer.ggml.padding_token_id"),
        )
        return cls(
            hf,
            eos_token_ids=list(dict.fromkeys(eos_ids)) or None,
            chat_template=field_value(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a Hugging Face folder.

        Stop tokens come from our saved extras, else ``generation_config.json``'s
        ``eos_token_id``, else the tokenizer's EOS token.
        """
        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        fast = _fast_tokenizer_cls()
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(d))
            if not getattr(hf, "is_fast", False):
                raise TypeError("slow tokenizer")
        except Exception:
            # Unknown tokenizer_class names etc.: the generic fast tokenizer reads tokenizer.json.
            hf = fast.from_pretrained(str(d))
        eos: list[int] | None = None
        template = None
        extra = d / EXTRA_FILE
        if extra.is_file():
            data = json.loads(extra.read_text())
            eos = data.get("eos_token_ids")
            template = data.get("chat_template")
        else:
            gen = d / "generation_config.json"
            if gen.is_file():
                e = json.loads(gen.read_text()).get("eos_token_id")
                if e is not None:
                    eos = [e] if isinstance(e, int) else list(e)
        return cls(hf, eos_token_ids=eos, chat_template=template)

    @classmethod
    def byte_level_for_tests(cls, vocab_size: int = 256) -> Tokenizer:
        """A 256-id byte-level tokenizer matching :func:`tiny_config` (BOS 1, EOS 2).

        Ids 0-7 are special tokens (``<unk> <s> </s> <|system|> <|user|> <|assistant|> <|end|>
        <pad>``); ids 8-255 are the bytes 0x08-0xFF, so any normal UTF-8 text round-trips (the
        control bytes 0x00-0x07 map to ``<unk>``). Ids past 255 are unused extra specials. The chat
        template is ``<|role|>content<|end|>`` per message.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256, got {vocab_size}")
        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        # alphabet() is unordered; rebuild GPT-2's byte->char table to order ids by byte value.
        b2c = _bytes_to_unicode()
        assert set(b2c.values()) == set(byte_chars)
        vocab = {t: i for i, t in enumerate(_TEST_SPECIALS)}
        for b in range(len(_TEST_SPECIALS), 256):
            vocab[b2c[b]] = b
        tk = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        specials = list(_TEST_SPECIALS) + [f"<|extra_{i}|>" for i in range(vocab_size - 256)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        hf = _fast_tokenizer_cls()(
            tokenizer_object=tk,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
        return cls(hf, eos_token_ids=(2,), chat_template=_TEST_TEMPLATE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char table (the ByteLevel spelling)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages; returns a normalised copy (content parts joined to a string)."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] is missing 'role'")
        if not isinstance(m["role"], str):
            raise ValueError(
                f"messages[{i}]['role'] must be a string, got {type(m['role']).__name__}"
            )
        if "content" not in m:
            raise ValueError(f"messages[{i}] is missing 'content'")
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not (
                    isinstance(p, dict)
                    and p.get("type") == "text"
                    and isinstance(p.get("text"), str)
                ):
                    raise ValueError(
                        f"messages[{i}]['content'][{j}] must be a {{'type': 'text', 'text': str}} part"
                    )
                parts.append(p["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ValueError(
                f"messages[{i}]['content'] must be a string or list of text parts, got {type(content).__name__}"
            )
        out.append({**m, "content": content})
    return out


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes a small sliding window (the last emitted token(s) plus the pending ones) rather than
    individual tokens so tokenizers that drop/merge leading spaces still produce exactly the full
    decode. Text ending in U+FFFD is held back: it means a multi-byte UTF-8 character is split
    across tokens and its remaining bytes have not arrived yet.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window used as decoding context
        self._read = 0  # tokens before this index have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def feed_many(self, token_ids: Sequence[int]) -> str:
        """Feed several tokens; returns their concatenated deltas."""
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. an incomplete UTF-8 tail, as U+FFFD) at stream end."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
