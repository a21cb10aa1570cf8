"""`edgellm` command line: generate, chat, info, train, bench. Errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from edgellm.errors import EdgeLLMError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (bf16 where the CPU has it natively)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from edgellm.sampling import SamplingParams
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed).validate()


def cmd_generate(args: argparse.Namespace) -> None:
    from edgellm import load, stream_generate
    sampling = _sampling(args)
    model, tokenizer = load(args.model, args.dtype)
    pieces, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, args.prompt, args.max_tokens, sampling, args.stop):
        if last.token is not None:
            tokens.append(last.token)
        pieces.append(last.text)
        if not args.json:
            print(last.text, end="", flush=True)
    stats = {"prompt_tokens": last.prompt_tokens, "generation_tokens": len(tokens), "ttft_s": round(last.ttft_s, 4),
             "prefill_tok_s": round(last.prefill_tok_s, 1), "decode_tok_s": round(last.decode_tok_s, 1),
             "finish_reason": last.finish_reason}
    if args.json:
        print(json.dumps({"text": "".join(pieces), "tokens": tokens, **stats}))
    else:
        print()
        print(f"[{stats['prompt_tokens']} prompt tokens, TTFT {stats['ttft_s'] * 1000:.0f} ms, "
              f"prefill {stats['prefill_tok_s']} tok/s, decode {stats['decode_tok_s']} tok/s, "
              f"{stats['generation_tokens']} tokens, {stats['finish_reason']}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from edgellm import PromptCache, load, stream_generate
    sampling = _sampling(args)
    model, tokenizer = load(args.model, args.dtype)
    cache = PromptCache(model, capacity=1024)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("edgellm chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode_chat(messages)
        reply, last = [], None
        for last in stream_generate(model, tokenizer, ids, args.max_tokens, sampling, args.stop, cache):
            reply.append(last.text)
            print(last.text, end="", flush=True)
        print()
        print(f"[reused {last.cached_tokens}/{last.prompt_tokens} prompt tokens from the KV cache, "
              f"TTFT {last.ttft_s * 1000:.0f} ms, {last.decode_tok_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> None:
    from edgellm.info import model_info
    info = model_info(args.path)
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")


def cmd_train(args: argparse.Namespace) -> None:
    from edgellm.train import run_train
    run_train(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from edgellm.bench import run_bench
    run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="On-device LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps its KV cache between turns")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameters, memory per dtype, KV bytes per token")
    p.add_argument("path", nargs="?", default=None, help="HF model directory (default: built-in model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a tokenizer and a small Llama model on the Python stdlib")
    from edgellm.train import add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks: speed")
    from edgellm.bench import add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
