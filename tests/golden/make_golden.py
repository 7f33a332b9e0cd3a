"""Build Hugging Face reference outputs for SmolLM2-135M-Instruct (the default GGUF).

Runs PyTorch + transformers in a SEPARATE virtualenv so the engine's environment stays
torch-free::

    python -m venv /tmp/goldenvenv && /tmp/goldenvenv/bin/pip install torch==2.13.0 \
        transformers==5.24.0 gguf==0.19.0 numpy jinja2 accelerate
    /tmp/goldenvenv/bin/python tests/golden/make_golden.py [--gguf PATH]

The GGUF defaults to ``$TOKENCAKE_MODEL_PATH`` or ``$TOKENCAKE_CACHE`` (default
``~/.cache/tokencake``)``/SmolLM2-135M-Instruct.Q4_1.gguf``; run ``tokencake`` once (or
``python -c "from tokencake.models.hub import default_model_path; default_model_path()"``) to
fetch it. Writes ``smollm2_golden.json`` (prompt ids, top-50 last-position logits, 32 greedy
tokens and their text per prompt) and ``smollm2_logits.npz`` (full float32 last-position logits,
key ``logits`` of shape ``[n_prompts, vocab]``) next to this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 32
TOP_K = 50


def default_gguf() -> Path:
    env = os.environ.get("TOKENCAKE_MODEL_PATH")
    if env:
        return Path(env)
    cache = Path(os.environ.get("TOKENCAKE_CACHE", Path.home() / ".cache" / "tokencake"))
    return cache / GGUF_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=default_gguf())
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    gguf_path: Path = args.gguf.resolve()
    if not gguf_path.is_file():
        sys.exit(f"GGUF not found: {gguf_path} (pass --gguf or set TOKENCAKE_MODEL_PATH)")

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # float32 on purpose: the engine's reference numerics are f32.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.eval()

    records = []
    all_logits = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        enc = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = [int(i) for i in enc["input_ids"]]
        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids).logits[0, -1].float().numpy()
            gen = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2,
            )
        new_ids = [int(i) for i in gen[0, len(ids) :]]
        order = np.argsort(-logits, kind="stable")[:TOP_K]
        all_logits.append(logits.astype(np.float32))
        records.append(
            {
                "prompt": prompt,
                "messages": messages,
                "prompt_ids": ids,
                "top_indices": [int(i) for i in order],
                "top_logits": [float(logits[i]) for i in order],
                "greedy_ids": new_ids,
                "greedy_text": tok.decode(new_ids, skip_special_tokens=False),
            }
        )
        print(f"{prompt!r} -> {records[-1]['greedy_text']!r}", flush=True)

    out = {
        "model": GGUF_NAME,
        "gguf_sha256": sha256(gguf_path),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "max_new_tokens": MAX_NEW_TOKENS,
        "top_k": TOP_K,
        "logits_file": "smollm2_logits.npz",
        "prompts": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2_golden.json").write_text(json.dumps(out, indent=1) + "\n")
    np.savez_compressed(args.out / "smollm2_logits.npz", logits=np.stack(all_logits))
    print(f"wrote {args.out / 'smollm2_golden.json'} and smollm2_logits.npz")


if __name__ == "__main__":
    main()
