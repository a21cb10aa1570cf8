"""`edgellm` command line: generate, chat, info, quantize, train, lora, plan, bench. Errors become one line and a
non-zero exit."""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from edgellm.errors import EdgeLLMError, InvalidRequestError

if TYPE_CHECKING:
    from edgellm.sampling import SamplingParams

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes -2**63..2**64-1; negative seeds only alias positive ones


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (and its subcommands', which inherit the class) use the house format."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(f"{message} (see `{self.prog} --help`)"))


def error_line(message: str) -> str:
    """The one stderr line every failure prints; newlines inside `message` would break the one-line contract."""
    return f"edgellm: error: {' '.join(message.splitlines())}\n"


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused at parse time instead of deep in torch or a socket."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}")
        return value
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite number; float() also takes 'inf' and 'nan', which no sampling knob means."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def agent_name(text: str) -> str:
    """An argparse type: an agent name that is safe as a file name in the store."""
    from edgellm.agents import check_agent_name
    try:
        return check_agent_name(text)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    from edgellm.bench.common import add_threads_argument
    p.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (bf16 where the CPU has it natively)")
    p.add_argument("--expert-budget", default=None,
                   help="MoE models: RAM for expert weights, e.g. 2GiB or 25%% (hot experts pinned, cold ones "
                        "read from the file on demand and prefetched a layer ahead)")
    add_threads_argument(p)


def _load(args: argparse.Namespace):
    """The model and tokenizer the command line names, its experts held within --expert-budget if given."""
    from edgellm import load
    model, tokenizer = load(args.model, args.dtype)
    if args.expert_budget:
        from edgellm.models import offload
        offload.enable(model, args.expert_budget)
    return model, tokenizer


def _adapter(args: argparse.Namespace, model) -> str | None:
    """Load --adapter DIR (a PEFT LoRA adapter) onto the model; its name for generation, None without one."""
    if not args.adapter:
        return None
    from edgellm.models.lora import load_adapter
    return load_adapter(model, args.adapter).name


def server_adapter(text: str) -> tuple[str, str]:
    """--adapter NAME=DIR for serve."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR, e.g. sql=adapters/sql-lora")
    return name, path


def _use_threads(threads: int) -> None:
    """Size torch's thread pool before the model first runs. The setting is process-wide: a thread started later
    (serve's engine) picks it up on its first torch call."""
    import torch
    torch.set_num_threads(threads)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=finite_float, default=1.0)
    p.add_argument("--min-p", type=finite_float, default=0.0)
    p.add_argument("--repetition-penalty", type=finite_float, default=1.0)
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=None, help="0 to 2**64-1 (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from edgellm.sampling import SamplingParams
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed).validate()


def _agent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", type=agent_name, default=None,
                   help="agent name: reuse and update its persistent KV memory")
    p.add_argument("--store", default="edgellm-agents", help="directory of agent memories (with --agent)")
    p.add_argument("--kv-format", default=None,
                   help="agent KV format: fp16, bf16, fp32, q8, q4, q2 (+ -kivi, -h); default: the model's dtype")


def _open_agent(args: argparse.Namespace, model, tokenizer, adapter: str | None):
    """The agent; it runs under the adapter its memory was made with (another --adapter is refused)."""
    from edgellm.agents import AgentStore
    agent = AgentStore(args.store, model, tokenizer, args.kv_format).agent(args.agent, adapter)
    if agent.restore_note:
        print(f"edgellm: saved memory not used ({agent.restore_note}); prefilling from scratch", file=sys.stderr)
    return agent


def _kv_predictor(args: argparse.Namespace, model, tokenizer):
    if not args.kv_predictor:
        return None
    from edgellm.kvpred import load_predictor
    return load_predictor(args.kv_predictor, model, tokenizer.fingerprint)


def _read_schema(path: str) -> dict:
    """The JSON schema in the file `path`, read before the model loads so a bad file fails at once."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidRequestError(f"--json-schema {path}: cannot read a JSON schema ({e})") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"--json-schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def _constrain(sampling: SamplingParams, args: argparse.Namespace, schema: dict | None, model,
               tokenizer) -> SamplingParams:
    """`sampling` with the grammar --json-schema or --json-object asks for (as the server's response_format)."""
    if schema is None and not args.json_object:
        return sampling
    from dataclasses import replace

    from edgellm.grammar import Grammar, llg_tokenizer
    try:
        grammar = Grammar.json(llg_tokenizer(tokenizer, int(model.args.vocab_size)), schema)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"--json-schema {args.json_schema}: {e}") from None
    return replace(sampling, grammar=grammar)


def _speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", type=int_in(0, 64), default=0, metavar="K",
                   help="speculative decoding: check up to K drafted tokens per forward pass (0 = off; 4 when "
                        "--draft-model or --spec-mode is given): greedy output unchanged, sampled output keeps its "
                        "distribution; the draft length adapts to what pays, and speculation turns off when it "
                        "does not")
    p.add_argument("--spec-mode", choices=("ngram", "draft", "kvpred"), default=None,  # speculative.MODES
                   help="who drafts: ngram (prompt lookup, the default), draft (--draft-model) or kvpred (the "
                        "--kv-predictor's aux model, whose cache already holds the prompt)")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="a smaller model sharing the model's tokenizer drafts the tokens (implies --spec-mode draft)")
    p.add_argument("--spec-fixed", action="store_true", help="always draft K tokens (no adaptive draft length)")
    p.add_argument("--draft-p-min", type=float, default=0.0, metavar="P",  # speculative.P_MIN
                   help="draft and kvpred: stop drafting at a guess the draft gives less than this probability")


def _speculation(args: argparse.Namespace, model, tokenizer):
    """(what `stream_generate`'s `speculate` takes, the draft model or None) from the command line."""
    from edgellm.speculative import Speculation, check_draft_model
    mode = args.spec_mode or ("draft" if args.draft_model else "ngram")
    if not (args.speculate or args.spec_mode or args.draft_model):
        return 0, None
    if args.draft_model and mode != "draft":
        raise InvalidRequestError(f"--draft-model drafts in --spec-mode draft, not {mode}; drop one of them")
    spec = Speculation(mode, args.speculate or 4, adaptive=not args.spec_fixed, p_min=args.draft_p_min).validate()
    if mode == "kvpred" and not args.kv_predictor:
        raise InvalidRequestError("--spec-mode kvpred drafts with the KV predictor's aux model; give --kv-predictor")
    if mode != "draft":
        return spec, None
    if not args.draft_model:
        raise InvalidRequestError("--spec-mode draft needs a --draft-model DIR sharing the model's tokenizer")
    from edgellm import load
    draft, draft_tokenizer = load(args.draft_model, args.dtype)
    check_draft_model(draft, draft_tokenizer, model, tokenizer)
    return spec, draft


def cmd_generate(args: argparse.Namespace) -> None:
    from edgellm import stream_generate
    sampling = _sampling(args)
    schema = _read_schema(args.json_schema) if args.json_schema else None
    _use_threads(args.threads)
    model, tokenizer = _load(args)
    sampling = _constrain(sampling, args, schema, model, tokenizer)
    predictor = _kv_predictor(args, model, tokenizer)
    speculate, draft = _speculation(args, model, tokenizer)
    adapter = _adapter(args, model)
    agent = _open_agent(args, model, tokenizer, adapter) if args.agent else None
    if agent:
        steps = agent.stream(args.prompt, args.max_tokens, sampling, args.stop, kv_predictor=predictor,
                             speculate=speculate, draft_model=draft)
    else:
        steps = stream_generate(model, tokenizer, args.prompt, args.max_tokens, sampling, args.stop,
                                kv_predictor=predictor, speculate=speculate, draft_model=draft, adapter=adapter)
    pieces, tokens, last = [], [], None
    for last in steps:
        if last.token is not None:
            tokens.append(last.token)
        pieces.append(last.text)
        if not args.json:
            print(last.text, end="", flush=True)
    if agent:
        agent.save()
    stats = {"prompt_tokens": last.prompt_tokens, "cached_tokens": last.cached_tokens,
             "generation_tokens": len(tokens), "ttft_s": round(last.ttft_s, 4),
             "prefill_tok_s": round(last.prefill_tok_s, 1), "decode_tok_s": round(last.decode_tok_s, 1),
             "finish_reason": last.finish_reason, "predicted_tokens": last.predicted_tokens, "threads": args.threads,
             "drafted_tokens": last.drafted_tokens, "accepted_tokens": last.accepted_tokens}
    if args.expert_budget:
        from edgellm.models import offload
        stats["experts"] = offload.installed(model).stats()
    if args.json:
        print(json.dumps({"text": "".join(pieces), "tokens": tokens, **stats}))
    else:
        print()
        print(f"[{stats['prompt_tokens']} prompt tokens, TTFT {stats['ttft_s'] * 1000:.0f} ms, "
              f"prefill {stats['prefill_tok_s']} tok/s, decode {stats['decode_tok_s']} tok/s, "
              f"{stats['generation_tokens']} tokens, {stats['finish_reason']}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from edgellm import PromptCache, stream_generate
    sampling = _sampling(args)
    _use_threads(args.threads)
    model, tokenizer = _load(args)
    predictor = _kv_predictor(args, model, tokenizer)
    speculate, draft = _speculation(args, model, tokenizer)
    adapter = _adapter(args, model)
    agent = _open_agent(args, model, tokenizer, adapter) if args.agent else None
    cache = agent.cache if agent else PromptCache(model, capacity=1024)
    adapter = agent.adapter if agent else adapter
    messages: list[dict] = agent.messages if agent else []
    if args.system and not messages:
        messages.append({"role": "system", "content": args.system})
    if agent and agent.messages:
        print(f"resuming agent {agent.name!r}: {len(agent.messages)} messages, {len(cache.tokens)} tokens "
              "of KV memory", file=sys.stderr)
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
        for last in stream_generate(model, tokenizer, ids, args.max_tokens, sampling, args.stop, cache, predictor,
                                    speculate, draft, adapter):
            if agent:
                agent.note_prediction(last.cached_tokens, last.predicted_tokens)
            reply.append(last.text)
            print(last.text, end="", flush=True)
        print()
        print(f"[reused {last.cached_tokens}/{last.prompt_tokens} prompt tokens from the KV cache, "
              f"TTFT {last.ttft_s * 1000:.0f} ms, {last.decode_tok_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})
        if agent:
            agent.messages = messages
            agent.save()


def cmd_agents(args: argparse.Namespace) -> None:
    from edgellm.agents import list_agents
    from edgellm.kv.persist import read_metadata
    root = Path(args.store)
    if args.action == "list":
        infos = [i.to_json() for i in list_agents(root)]
        if args.json:
            print(json.dumps(infos))
        for info in [] if args.json else infos:
            print(f"{info['name']:<24} {info['tokens']:>7} tokens  {info['file_bytes'] / 2**20:8.2f} MiB  "
                  f"{info['kv_format']}{'  (predicted)' if info['predicted'] else ''}")
        return
    if not args.name:
        raise InvalidRequestError(f"`edgellm agents {args.action}` needs an agent name")
    path = root / f"{args.name}.safetensors"
    if not path.exists():
        raise InvalidRequestError(f"no agent {args.name!r} in {root}")
    if args.action == "show":
        meta = read_metadata(path)
        meta.pop("checksums", None)
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    else:
        path.unlink()
        print(f"removed agent {args.name!r}")


def cmd_info(args: argparse.Namespace) -> None:
    from edgellm.info import model_info
    info = model_info(args.path)
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from edgellm.quant.convert import quantize_checkpoint
    r = quantize_checkpoint(args.in_dir, args.out_dir, args.format, args.dtype, args.force, args.method)
    print(f"wrote {r.out_dir}: {r.quantized_tensors} projections as {r.format} ({r.bits_per_weight} bits/weight), "
          f"{r.input_bytes / 2**20:.1f} MiB -> {r.output_bytes / 2**20:.1f} MiB in {r.seconds:.1f} s")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from edgellm.quant.gguf_write import export_gguf
    out = export_gguf(args.in_dir, args.out, args.type)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")


def cmd_train(args: argparse.Namespace) -> None:
    from edgellm.train import run_train
    run_train(args)


def cmd_lora_train(args: argparse.Namespace) -> None:
    from edgellm.train import run_lora_train
    run_lora_train(args)


def cmd_kvpred(args: argparse.Namespace) -> None:
    from edgellm.kvpred import run_kvpred
    run_kvpred(args)


def check_port_free(host: str, port: int) -> None:
    """Bind once before loading the model: uvicorn reports a busy port as log lines and exit 3, not one line.

    The port can still be taken between this check and uvicorn's bind; only serve() binding its own socket
    would close that window.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise InvalidRequestError(f"cannot listen on {host}:{port} ({e.strerror or e}); stop the process "
                                      "holding it or pick another --port") from None


def _server_speculation(text: str | None):
    """`--speculative MODE[:K]` as a Speculation (None when not given)."""
    if text is None:
        return None
    from edgellm.speculative import Speculation
    mode, _, k = text.partition(":")
    if k and not k.isdigit():
        raise InvalidRequestError(f"--speculative {text}: K must be a whole number of tokens")
    return Speculation(mode, int(k) if k else 8).validate()


def cmd_serve(args: argparse.Namespace) -> None:
    from edgellm.serve import serve
    check_port_free(args.host, args.port)
    _use_threads(args.threads)
    serve(args.model, args.host, args.port, args.store, args.kv_format, args.memory_budget, args.max_concurrency,
          args.max_queue, args.api_key, args.dtype, args.prefill_chunk, args.kv_predictor,
          expert_budget=args.expert_budget, block_tokens=args.kv_block_tokens or None, draft_model=args.draft_model,
          speculation=_server_speculation(args.speculative), adapters=args.adapter, replicas=args.replicas,
          ray_address=args.ray_address, replica_threads=args.replica_threads,
          replica_lease_s=args.replica_lease)


def cmd_bench(args: argparse.Namespace) -> None:
    from edgellm.bench import run_bench
    run_bench(args)


def cmd_plan(args: argparse.Namespace) -> None:
    from edgellm.plan import run_plan
    run_plan(args)


def build_parser(only_plan: bool = False) -> argparse.ArgumentParser:
    """The whole command line; `only_plan`: just `edgellm plan`, whose predictions answer in well under 2 s because
    none of the other subcommands' argument setup (which imports torch) runs."""
    parser = ArgumentParser(prog="edgellm", description="On-device LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    if only_plan:
        _add_plan_parser(sub)
        return parser

    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(p)
    _sampling_args(p)
    _agent_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--kv-predictor", default=None,
                   help="KV predictor (from `edgellm kvpred train`): predict the prompt's KV cache to cut TTFT")
    _speculation_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter directory, applied unmerged")
    constrain = p.add_mutually_exclusive_group()
    constrain.add_argument("--json-schema", default=None, metavar="FILE",
                           help="constrain the output to JSON valid against the JSON schema in FILE (llguidance)")
    constrain.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps its KV cache between turns")
    _model_args(p)
    _sampling_args(p)
    _agent_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA adapter directory, applied unmerged")
    p.add_argument("--kv-predictor", default=None, help="KV predictor: predict each turn's new prompt K/V")
    _speculation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("agents", help="list, show or remove saved agent memories")
    p.add_argument("action", choices=["list", "show", "rm"])
    p.add_argument("name", nargs="?", type=agent_name, default=None)
    p.add_argument("--store", default="edgellm-agents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_agents)

    p = sub.add_parser("info", help="architecture, parameters, memory per dtype, KV bytes per token")
    p.add_argument("path", nargs="?", default=None, help="HF model directory (default: built-in model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write a copy of a HF checkpoint with quantized projection weights")
    p.add_argument("in_dir", help="full-precision HF model directory")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("--format", required=True,
                   help="q4_0, q8_0, mxfp4, int4-g32|g64|g128, int3-g.., int2-g.., ternary, ternary-g128")
    p.add_argument("--dtype", default="bf16", help="dtype of the tensors left unquantized (embeddings, norms): "
                   "bf16 or fp32")
    p.add_argument("--method", default="rtn", choices=["rtn", "mse"],
                   help="rtn: round to nearest from each group's min/max; mse: per-group clipping search that "
                   "lowers the error (intN formats only)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-gguf", help="write a checkpoint as a llama.cpp GGUF file")
    p.add_argument("in_dir", help="HF model directory (full precision or from `edgellm quantize`)")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="f16", help="f16, q8_0, q4_0 or f32 (norms stay f32; quantized blocks are kept)")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("train", help="train a tokenizer and a small Llama model on the Python stdlib")
    from edgellm.train import add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lora", help="LoRA adapters: train one on a text file (PEFT format)")
    lora = p.add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("train", help="fine-tune a LoRA adapter on a text file, the base frozen")
    from edgellm.train import add_lora_train_arguments
    add_lora_train_arguments(p)
    p.set_defaults(func=cmd_lora_train)

    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching and persistent agents")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address; non-loopback needs --api-key")
    p.add_argument("--port", type=int_in(1, 65535), default=8000)
    p.add_argument("--store", default="edgellm-agents",
                   help="directory of agent memories, or a shared store leased per agent: file:///dir, "
                        "redis://host:port/db")
    p.add_argument("--kv-format", default=None,
                   help="KV format: fp16, bf16, fp32, q8, q4, q2 (+ -kivi, -h); default: the model's dtype")
    p.add_argument("--memory-budget", default=None,
                   help="RAM for KV memory, e.g. 2GiB: one block pool that every agent and request draws from "
                        "(shared prefixes stored once; idle agents written back to disk when it is full)")
    p.add_argument("--kv-block-tokens", type=int_in(1, 1 << 16), default=None,
                   help="tokens per KV pool block (default 64): the unit of allocation and prefix sharing")
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together per step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step: smaller keeps running streams smoother")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint")
    p.add_argument("--kv-predictor", default=None,
                   help="KV predictor that requests can opt into with the body field \"kv_prediction\": true")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="a draft model sharing the tokenizer, for requests with \"speculative\": {\"mode\": \"draft\"}")
    p.add_argument("--speculative", default=None, metavar="MODE[:K]",
                   help="default speculative decoding for requests without a \"speculative\" field: ngram, draft or "
                        "kvpred, with the longest draft K (default 8); the draft length adapts")
    p.add_argument("--adapter", type=server_adapter, action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter requests select with model \"<model>:NAME\" or \"adapter\": \"NAME\" "
                        "(repeatable)")
    p.add_argument("--replicas", type=int_in(1, 1024), default=0,
                   help="run N engine replicas under Ray Serve (pip install 'ray[serve]'), each agent routed to a home "
                        "replica and taken over by another from the shared --store when it is down or busy")
    p.add_argument("--ray-address", default=None, help="with --replicas: a running Ray cluster (default: start one)")
    p.add_argument("--replica-threads", type=int_in(1, 1024), default=1,
                   help="with --replicas: CPU threads per replica")
    p.add_argument("--replica-lease", type=finite_float, default=None, metavar="SECONDS",
                   help="with --replicas: how long an agent stays leased to its replica after its last use (default "
                        "10): a killed replica's agents wait this long before another takes them over; shorter "
                        "fails over sooner but renews leases more often")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("kvpred", help="KV Prediction: train an aux model that predicts the base's prompt KV cache")
    from edgellm.kvpred import add_kvpred_arguments
    add_kvpred_arguments(p)
    p.set_defaults(func=cmd_kvpred)

    _add_plan_parser(sub)

    p = sub.add_parser("bench", help="benchmarks: speed, kv, serve, quant, kernels, kvpred, structured")
    from edgellm.bench import add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="performance planner: memory, TTFT, tok/s per model x format x device "
                       "(calibrate, validate)")
    from edgellm.plan.command import add_arguments as add_plan_arguments
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only_plan=argv[:1] == ["plan"]).parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (EdgeLLMError, OSError) as e:  # OSError: unwritable --store, full disk, missing permissions
        sys.stderr.write(error_line(str(e)))
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
