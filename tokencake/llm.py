"""The in-process library facade: ``LLM().generate(...)`` and ``LLM().chat(...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.outputs import RequestOutput
from tokencake.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Offline generation over one model with continuous batching.

    ``LLM()`` loads the default model (SmolLM2-135M-Instruct); ``LLM(model=PATH)`` loads a GGUF
    file, a Hugging Face checkpoint folder or a ``tokencake convert`` orbax checkpoint. Other
    keyword arguments are :class:`EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        obj = cls.__new__(cls)
        obj.engine = engine
        return obj

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched together); outputs come back in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or several) and generate."""
        if messages and isinstance(messages, list) and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)
        prompts = [
            self.engine.tokenizer.apply_chat_template(c, add_generation_prompt=True)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        """Final outputs in request order; a request with ``n > 1`` contributes its choices
        in index order."""
        final: dict[str, dict[int, RequestOutput]] = {i: {} for i in ids}
        done: set[str] = set()
        while len(done) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in final:
                    final[out.request_id][out.index] = out
                    if out.request_finished:
                        done.add(out.request_id)
        return [final[i][k] for i in ids for k in sorted(final[i])]
