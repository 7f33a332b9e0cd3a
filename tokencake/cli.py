"""The ``tokencake`` command: generate, chat, convert, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="GGUF file, HF folder or orbax checkpoint (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--policy", default="vllm", help="scheduling policy (vllm, tokencake, ...)")
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="device KV pool size in GiB")
    p.add_argument(
        "--host-kv-gib", type=float, default=0.0, help="host KV pool size in GiB (0 = no host tier)"
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--attention-backend", default="auto", help="auto, reference, pallas-gpu or pallas-tpu"
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument(
        "--distributed", action="store_true", help="multi-host: call jax.distributed.initialize()"
    )


def engine_config_from_args(args: argparse.Namespace, **extra: Any):
    from tokencake.config import EngineConfig

    options = dict(
        model=args.model, policy=args.policy, kv_cache_gib=args.kv_cache_gib, host_kv_gib=args.host_kv_gib,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
        attention_backend=args.attention_backend, tensor_parallel_size=args.tensor_parallel_size,
        distributed=args.distributed,
    )  # fmt: skip
    return EngineConfig(**{**options, **extra})


def _sampling(args: argparse.Namespace):
    from tokencake.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def _stream(engine, prompt, params) -> str:
    """Run one request on the sync engine, printing text as it is produced."""
    rid = engine.add_request(prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
                text = out.text
    sys.stdout.write("\n")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from tokencake.engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1, warmup=False))
    prompt = args.prompt
    if not args.raw:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(engine, prompt, _sampling(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokencake.engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1, warmup=False))
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat with the model; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(messages)
        reply = _stream(engine, ids, _sampling(args))
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tokencake.models.checkpoint import convert

    src = None if args.src in ("default", "-") else args.src
    out = convert(src, args.dst, progress=True, overwrite=args.overwrite)
    print(f"wrote orbax checkpoint to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tokencake.server import run_server
    from tokencake.server.connections import ConnectionLimits

    limits = ConnectionLimits(
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
    )
    run_server(
        engine_config_from_args(args), host=args.host, port=args.port, api_key=args.api_key,
        limits=limits, max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
        lenient=args.lenient,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencake", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt (streamed)")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    chat = sub.add_parser("chat", help="interactive chat")
    chat.add_argument("--system", default=None)
    for p in (gen, chat):
        _add_engine_flags(p)
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser(
        "convert", help="write an orbax checkpoint (SRC: GGUF, HF folder or 'default')"
    )
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with the Tokencake extension"
    )
    _add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (also $TOKENCAKE_API_KEY)",
    )
    serve.add_argument(
        "--lenient",
        action="store_true",
        help="ignore unknown request fields (default: refuse the request, listing every one)",
    )
    limits = serve.add_argument_group("limits (hostile clients)")
    limits.add_argument("--max-connections", type=int, default=1000,
                        help="open connections at most; one more is answered 503 at once "
                             "(default %(default)s)")  # fmt: skip
    limits.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a new connection has to send its request headers "
                             "(default %(default)s)")  # fmt: skip
    limits.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds to receive a request body, else 408 (default %(default)s)")  # fmt: skip
    limits.add_argument("--keepalive-timeout", type=float, default=15.0,
                        help="seconds an idle keep-alive connection stays open "
                             "(default %(default)s)")  # fmt: skip
    limits.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                        help="largest request body after decoding, else 413 (default %(default)s)")  # fmt: skip
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "api_key", None) is None and "api_key" in vars(args):
        args.api_key = os.environ.get("TOKENCAKE_API_KEY")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tokencake: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
