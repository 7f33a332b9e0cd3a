"""A model's own sampling defaults: read from GGUF ``general.sampling.*`` and HF
``generation_config.json``, used by the server for a request that omits them (explicit values
win), and the default model's model-card settings."""

from __future__ import annotations

import json

import pytest

from tests.fixtures_models import write_gguf
from tests.test_server import ENGINE, post
from tokencake.async_engine import AsyncEngine
from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.models import generation, hub
from tokencake.models.config import tiny_config
from tokencake.models.gguf_loader import load_gguf, open_gguf
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import random_params
from tokencake.server import BackgroundServer
from tokencake.server.protocol import with_sampling_defaults


def test_hf_generation_config_keeps_only_recommendations(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 50, "do_sample": True})
    )
    # top_k 50 is transformers' own default, not a recommendation (vLLM's to_diff_dict rule).
    assert generation.from_hf_folder(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 20, "top_p": 1.0}))
    assert generation.from_hf_folder(tmp_path) == {"top_k": 20}
    assert generation.from_hf_folder(tmp_path / "missing") == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match="top_p"):
        generation.from_hf_folder(tmp_path)


def test_gguf_sampling_keys_round_trip(tmp_path):
    cfg = tiny_config(sampling_defaults={"temperature": 0.7, "top_p": 0.8, "top_k": 40})
    path = write_gguf(
        tmp_path / "m.gguf", cfg, random_params(cfg), Tokenizer.byte_level_for_tests()
    )
    assert generation.from_gguf(open_gguf(path)) == {"temperature": 0.7, "top_p": 0.8, "top_k": 40}
    got, _ = load_gguf(path)
    assert got.sampling_defaults == cfg.sampling_defaults
    with pytest.raises(ValueError, match="unknown key"):
        tiny_config(sampling_defaults={"min_p": 0.1})


def test_with_sampling_defaults_explicit_wins():
    omitted = {"temperature": None, "top_p": None, "top_k": None, "seed": 3}
    assert with_sampling_defaults(omitted, {}) == {
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 3,
    }  # fmt: skip
    model = {"temperature": 0.2, "top_p": 0.9}
    assert with_sampling_defaults(omitted, model) == {
        "temperature": 0.2, "top_p": 0.9, "top_k": 0, "seed": 3,
    }  # fmt: skip
    explicit = {"temperature": 1.5, "top_p": None, "top_k": 5}
    assert with_sampling_defaults(explicit, model) == {"temperature": 1.5, "top_p": 0.9, "top_k": 5}


def test_default_model_uses_its_model_card_settings():
    assert hub.DEFAULT_SAMPLING == {"temperature": 0.2, "top_p": 0.9}
    assert generation.checked(hub.DEFAULT_SAMPLING, "hub") == hub.DEFAULT_SAMPLING


@pytest.fixture(scope="module")
def greedy_by_default(tiny_model):
    """A server whose model recommends greedy decoding (temperature 0)."""
    cfg, params, tok = tiny_model
    cfg = cfg.replace(sampling_defaults={"temperature": 0.0})
    engine = AsyncEngine(
        LLMEngine(EngineConfig(**ENGINE), model_config=cfg, params=params, tokenizer=tok)
    )
    server = BackgroundServer(engine)
    yield server
    server.stop()
    engine.shutdown()


def test_server_applies_the_models_defaults_when_omitted(greedy_by_default):
    url = greedy_by_default.url + "/v1/completions"

    def text(**fields) -> str:
        body = {"prompt": "agents call tools", "max_tokens": 16, "ignore_eos": True, **fields}
        r = post(url, json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    # Omitted: the model's temperature 0 applies, whatever the seed.
    assert text() == greedy and text(seed=1) == greedy and text(seed=2) == greedy
    # Explicit values win: sampling at temperature 1 with different seeds departs from greedy.
    sampled = {text(temperature=1.0, seed=s) for s in range(4)}
    assert sampled != {greedy}
