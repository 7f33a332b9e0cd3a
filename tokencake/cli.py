"""The ``tokencake`` command: generate, chat, convert, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tokencake.models.hub import DEFAULT_MODEL
from tokencake.scheduler.policies import policy_names


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,  # its served name; models.hub.resolve_model accepts it
        help="GGUF file, HF folder or orbax checkpoint; the default model is fetched on first use",
    )
    p.add_argument("--policy", default="vllm", choices=policy_names(), help="scheduling policy")
    p.add_argument(
        "--tokencake-config",
        metavar="FILE",
        default=None,
        help="JSON file of Tokencake settings for the tokencake* policies: "
        '{"scheduling": {...}, "offload": {...}} with TokencakeConfig\'s fields',
    )
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="device KV pool size in GiB")
    p.add_argument(
        "--host-kv-gib", type=float, default=0.0, help="host KV pool size in GiB (0 = no host tier)"
    )
    p.add_argument("--max-model-len", type=int, default=2048, help="longest sequence, in tokens")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most requests in one step")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV"
    )
    p.add_argument(
        "--weight-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the matrices, embedding and LM head (default: --dtype); bfloat16 under float32 "
        "rounds each dot's input to bfloat16 and sums in float32: 1.4-1.6x faster batched "
        "decode and prefill on a CPU with AVX512_BF16; outputs close to float32's, not equal",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="auto, chunked, reference, pallas-gpu or pallas-tpu",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices per model")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one process per host joined by jax.distributed (JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID); process 0 serves, the others follow it",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan and dispatch each step while the one before runs on the device "
        "(default: on, except with --tensor-parallel-size > 1 or --distributed)",
    )
    p.add_argument(
        "--fused-steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a step's prefill chunk and decode rows as one device call (one weight read; "
        "default: on with one CPU device, off elsewhere)",
    )


def engine_config_from_args(args: argparse.Namespace, **extra: Any):
    from tokencake.config import EngineConfig

    options = dict(
        model=args.model, policy=args.policy, kv_cache_gib=args.kv_cache_gib, host_kv_gib=args.host_kv_gib,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
        weight_dtype=args.weight_dtype, attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed=args.distributed, tokencake=_tokencake_config(args.tokencake_config),
        overlap=args.overlap, fused_steps=args.fused_steps,
    )  # fmt: skip
    return EngineConfig(**{**options, **extra})


def _tokencake_config(path: str | None) -> dict[str, Any] | None:
    """The ``--tokencake-config`` file's JSON object (EngineConfig checks its keys strictly)."""
    if path is None:
        return None
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--tokencake-config: no such file {path}") from None
    except ValueError as exc:
        raise ValueError(f"--tokencake-config {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--tokencake-config {path}: expected a JSON object")
    return data


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

    if args.distributed:  # every process would schedule on its own; serve has one leader
        raise ValueError("--distributed is supported by 'tokencake serve' only")

    engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1, warmup=False))
    prompt = args.prompt
    if not args.raw:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(engine, prompt, _sampling(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokencake.engine import LLMEngine

    if args.distributed:  # every process would schedule on its own; serve has one leader
        raise ValueError("--distributed is supported by 'tokencake serve' only")

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
    from tokencake.server.listen import listen_socket

    config = engine_config_from_args(args)
    if args.distributed:  # one process per host: process 0 serves, the others follow it
        from tokencake.distributed import init_distributed
        from tokencake.server.run import run_follower

        init_distributed()
        import jax

        if jax.process_index() != 0:
            return run_follower(config)
    sock = listen_socket(args.host, args.port)  # before the model loads: a taken port fails now
    from tokencake import multihost
    from tokencake.server.connections import ConnectionLimits
    from tokencake.server.run import run_server

    limits = ConnectionLimits(
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
    )
    try:
        run_server(
            config,
            args.host,
            args.port,
            args.api_key,
            log_format=args.log_format,
            sock=sock,
            limits=limits,
            lenient=args.lenient,
            max_body_bytes=args.max_body_bytes,
            body_timeout_s=args.body_timeout,
        )
    except multihost.ProcessGroupFailed as exc:
        print(f"tokencake: error: {exc}", file=sys.stderr)
        multihost.exit_now(1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="tokencake", description=__doc__, formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt (streamed)", formatter_class=fmt)
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    chat = sub.add_parser("chat", help="interactive chat", formatter_class=fmt)
    chat.add_argument("--system", default=None, help="system prompt")
    for p in (gen, chat):
        _add_engine_flags(p)
        p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
        p.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser(
        "convert",
        help="write an orbax checkpoint (SRC: GGUF, HF folder or 'default')",
        formatter_class=fmt,
    )
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with the Tokencake extension",
        formatter_class=fmt,
    )
    _add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text: a warm-up progress bar and a 'serving ... on URL' line; json: one JSON "
        "object per event and request on stderr",
    )
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
    limits = serve.add_argument_group("limits against hostile clients")
    limits.add_argument("--max-connections", type=int, default=1000,
                        help="open connections at most; one more is answered 503 at once")  # fmt: skip
    limits.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a new connection has to send complete request headers")  # fmt: skip
    limits.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds to receive a request body (408 past it)")  # fmt: skip
    limits.add_argument("--keepalive-timeout", type=float, default=15.0,
                        help="seconds an idle keep-alive connection stays open")  # fmt: skip
    limits.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                        help="largest request body after decoding (413 past it)")  # fmt: skip
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from tokencake.logs import setup_text_logging

    args = build_parser().parse_args(argv)
    setup_text_logging(logging.INFO if args.verbose else logging.WARNING)
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
