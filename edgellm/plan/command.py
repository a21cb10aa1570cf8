"""`edgellm plan`: predict, search, calibrate, validate; arguments, model and device resolution, printing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgellm.bench.common import positive_int, thread_count, thread_counts
from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import parse_bytes, physical_cores

ACTIONS = ("predict", "calibrate", "validate", "devices", "models")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=ACTIONS, default="predict",
                   help="predict (default): a plan for --model; calibrate: measure this machine; validate: the "
                        "planner's error here and on published points; devices / models: the catalogs")
    p.add_argument("--model", default=None, help="catalog name (see `edgellm plan models`), HF directory or .gguf")
    p.add_argument("--format", default=None, help="weight format: fp32, bf16, q8_0, q4_0, int2-g64, q4_k, ... "
                   "(default: the checkpoint's, or bf16 for a catalog model)")
    p.add_argument("--kv-format", default="fp16", help="KV cache format: fp16, q8, q4, q4-kivi-h, ... (default fp16)")
    p.add_argument("--context", type=positive_int, default=1024, help="prompt tokens / cached context (default 1024)")
    p.add_argument("--concurrency", type=positive_int, default=4, help="sequences a server decodes together")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="threads (default: the most the profile was calibrated with)")
    p.add_argument("--device", default=None, help="a catalog device (see `edgellm plan devices`); default: this "
                   "machine's calibrated profile")
    p.add_argument("--profile", type=Path, default=None, help="device profile JSON to read (predict, validate) or "
                   "write (calibrate); default: the edgellm cache dir")
    p.add_argument("--memory", type=parse_bytes_arg, default=None,
                   help="memory budget, e.g. 8GiB: MoE expert placement, and the search's limit")
    p.add_argument("--target-tok-s", type=float, default=None,
                   help="search formats, KV formats, threads and expert budgets; print the Pareto set and the "
                        "settings that reach this decode speed")
    p.add_argument("--calibrate-threads", type=thread_counts, default=sorted({1, physical_cores()}),
                   help="calibrate: thread counts to measure (default %(default)s)")
    p.add_argument("--reduced", action="store_true", help="validate: the small CI set (seconds, tiny models)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="validate: time every case this many times, a pass over all checkpoints apart, keeping the "
                        "fastest (a shared host's neighbours only slow a timing down; default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="predict: a roofline PNG with the model's ops placed")


def parse_bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_model(name: str | None):
    """(ModelSpec, default format) from a catalog name, a HF directory or a GGUF file, without loading weights."""
    from edgellm.perf.catalog import MODELS, NATIVE_FORMAT
    from edgellm.perf.costmodel import ModelSpec

    if name is None:
        raise InvalidRequestError("`edgellm plan` needs --model: a catalog name (`edgellm plan models`), a HF "
                                  "directory or a .gguf file")
    key = name.strip().lower()
    if key in MODELS:
        return ModelSpec.from_config(MODELS[key], key), NATIVE_FORMAT.get(key, "bf16")
    path = Path(name)
    if path.suffix.lower() == ".gguf":
        return _gguf_model(path)
    if not path.exists():
        raise InvalidRequestError(f"--model {name!r} is neither a catalog model ({', '.join(MODELS)}) nor a path")
    from edgellm.checkpoint import quant_format, read_config
    config = read_config(path)
    fmt = quant_format(config, path)
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(config.get("torch_dtype")), "bf16")
    return ModelSpec.from_config(config, path.name), fmt.name if fmt else dtype


def _gguf_model(path: Path):
    """A GGUF's spec and its projections' most common tensor type (the file's effective format)."""
    from collections import Counter

    from edgellm.perf.costmodel import ModelSpec
    from edgellm.quant.gguf_file import gguf_config, open_gguf

    reader = open_gguf(path)
    types = Counter(t.tensor_type.name.lower() for t in reader.tensors
                    if t.name.startswith("blk.") and t.name.endswith("weight") and len(t.shape) == 2)
    fmt = {"f32": "fp32", "f16": "fp16"}.get(types.most_common(1)[0][0], types.most_common(1)[0][0]) if types \
        else "bf16"
    return ModelSpec.from_config(gguf_config(reader, path), path.name), fmt


def resolve_device(args: argparse.Namespace):
    """A catalog device, the profile file named, this machine's calibrated profile, or the labelled default."""
    from edgellm.perf.catalog import DEVICES
    from edgellm.perf.profile import default_cpu_profile, default_profile_path, load_profile

    if args.device:
        if args.device.lower() not in DEVICES:
            raise InvalidRequestError(f"unknown --device {args.device!r}; one of {', '.join(DEVICES)}")
        return DEVICES[args.device.lower()]
    if args.profile:
        return load_profile(args.profile)
    if default_profile_path().exists():
        return load_profile(default_profile_path())
    return default_cpu_profile()


def run_plan(args: argparse.Namespace) -> None:
    {"predict": cmd_predict, "calibrate": cmd_calibrate, "validate": cmd_validate, "devices": cmd_devices,
     "models": cmd_models}[args.action](args)


def cmd_predict(args: argparse.Namespace) -> None:
    from edgellm.layouts import KVFormat
    from edgellm.perf.planner import Request, predict
    from edgellm.perf.weights import check_format

    start = time.perf_counter()
    spec, default_fmt = resolve_model(args.model)
    device = resolve_device(args)
    fmt = check_format(args.format or default_fmt)
    req = Request(fmt, KVFormat.parse(args.kv_format), args.context, args.concurrency, args.threads, args.memory)
    device.rates(args.threads)  # an uncalibrated thread count fails here, in one line
    plan = predict(spec, req, device)
    if args.target_tok_s is not None:
        plan["search"] = _search(spec, req, device, args)
    plan["planner_seconds"] = time.perf_counter() - start
    _print_plan(plan, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=2))
    if args.plot:
        from edgellm.plan.roofline import plot_roofline
        plot_roofline(plan, device, args.threads, args.plot)


def _search(spec, req, device, args: argparse.Namespace) -> dict:
    from edgellm.perf.search import candidates, pareto

    memory = args.memory if args.memory is not None else device.memory_bytes
    rows = candidates(spec, req, device, memory)
    front = pareto(rows)
    reach = sorted((r for r in rows if r["decode_tok_s"] >= args.target_tok_s),
                   key=lambda r: (r["quality_cost_pct"], -r["decode_tok_s"]))
    return {"memory_bytes": memory, "target_tok_s": args.target_tok_s, "candidates": len(rows), "pareto": front,
            "meeting_target": reach[:10],
            "not_modelled": "speculation and KV Prediction (their gains depend on the text, not the device)"}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _print_plan(plan: dict, device) -> None:
    mem = plan["memory"]
    if device.kind == "default":
        print("note: no calibrated profile for this machine; using the built-in default CPU rates. Run "
              "`edgellm plan calibrate` for figures measured here.", file=sys.stderr)
    print(f"{plan['model']}: {plan['parameters'] / 1e9:.3f}B parameters ({plan['active_parameters'] / 1e9:.3f}B "
          f"active), {plan['format']} weights, {plan['kv_format']} KV, context {plan['context']}")
    print(f"device: {device.name} [{device.kind}; {device.source}]")
    print(f"memory: weights {_gib(mem['weights_bytes'])}, KV {mem['kv_bytes_per_token'] / 1024:.1f} KiB/token = "
          f"{_gib(mem['kv_bytes_per_agent'])} per agent at {plan['context']} tokens, total "
          f"{_gib(mem['total_bytes'])} with {plan['concurrency']} sequence(s)")
    print("agents per GiB of KV at this context: " + ", ".join(
        f"{k} {v['agents_per_gib']:.1f}" for k, v in mem["agents_per_gib"].items()))
    print(f"TTFT at {plan['context']} tokens: {plan['ttft_s'] * 1000:.0f} ms ({plan['prefill_tok_s']:.0f} tok/s); "
          f"decode {plan['decode_tok_s']:.1f} tok/s ({plan['decode_step_ms']:.1f} ms/token, "
          f"{plan['decode_gbs']:.1f} GB/s); server at concurrency {plan['concurrency']}: "
          f"{plan['server_tok_s']:.1f} tok/s")
    if "energy_j_per_token" in plan:
        print(f"energy: {plan['energy_j_per_token']:.3f} J/token alone, {plan['energy_j_per_token_server']:.3f} "
              f"J/token at concurrency {plan['concurrency']} (at the device's {device.power_w:.0f} W)")
    if "moe" in plan:
        moe = plan["moe"]
        print(f"MoE: {moe['experts']}; {_gib(moe['active_bytes_per_token'])} read per token; experts "
              f"{_gib(moe['expert_bytes'])} placed " + ", ".join(
                  f"{p['share'] * 100:.0f}% {p['tier']}" for p in moe["placement"]))
    for phase in ("decode_ops", "prefill_ops"):
        print(f"{phase.replace('_', ' ')}:  op                      GFLOP      MB        ms  bound")
        for op in plan[phase]:
            print(f"  {op['op']:<28} {op['gflop']:9.3f} {op['mbytes']:9.1f} {op['ms']:9.2f}  {op['bound']}")
    if "search" in plan:
        _print_search(plan["search"])
    print(f"(planned in {plan['planner_seconds'] * 1000:.0f} ms, nothing run)")


def _print_search(search: dict) -> None:
    def line(r: dict) -> str:
        share = f" experts {r['expert_share'] * 100:.0f}% in RAM" if r["expert_share"] is not None else ""
        threads = f" {r['threads']}T" if r["threads"] else ""
        return (f"  {r['format']:<9} KV {r['kv_format']:<10}{threads}{share}: {r['decode_tok_s']:8.1f} tok/s, "
                f"TTFT {r['ttft_s'] * 1000:7.0f} ms, {_gib(r['memory_bytes'])}, quality cost "
                f"{r['quality_cost_pct']:+.2f}% ppl")
    print(f"search: {search['candidates']} settings fit in {_gib(search['memory_bytes'])}; Pareto set "
          "(decode speed vs measured quality cost):")
    for r in search["pareto"]:
        print(line(r))
    print(f"reaching {search['target_tok_s']} tok/s, least quality cost first:" if search["meeting_target"]
          else f"no setting reaches {search['target_tok_s']} tok/s within the budget")
    for r in search["meeting_target"]:
        print(line(r))
    print(f"not modelled: {search['not_modelled']}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from edgellm.perf.profile import default_profile_path
    from edgellm.plan.calibrate import calibrate

    profile = calibrate(args.calibrate_threads, log=lambda m: print(m, file=sys.stderr))
    path = profile.save(args.profile or default_profile_path())
    print(f"wrote {path} ({profile.name}, threads {sorted(profile.threads)}, "
          f"{profile.extra['calibration_seconds']:.0f} s)")
    for t, r in sorted(profile.threads.items()):
        print(f"{t} thread(s): DRAM {r.dram_gbs:.1f} GB/s; fused decode GB/s " + ", ".join(
            f"{k} {v:.1f}" for k, v in r.weight_gbs.items()) + f"; decode attention {r.attention_gflops:.1f} GFLOP/s; "
            f"step {r.step_overhead_s * 1e3:.2f} ms + {r.layer_overhead_s * 1e3:.3f} ms/layer")
        if r.measured:
            print("  op-at-a-time linear, GFLOP/s at 4 / 16 / 256 rows (a 1024x1024 projection): " + ", ".join(
                f"{k} " + " / ".join(f"{2 * m * 2**20 / r.linear_s(k, m, 2**20, 1024, 1024, 1) / 1e9:.0f}"
                                     for m in (4, 16, 256)) for k in r.linear))


def cmd_validate(args: argparse.Namespace) -> None:
    from edgellm.plan.validate import FULL, REDUCED, external, validate

    device = resolve_device(args)
    report = validate(device, REDUCED if args.reduced else FULL, log=lambda m: print(m, file=sys.stderr),
                      rounds=args.rounds)
    report["external"] = external()
    print_validation(report)
    if args.json:
        from edgellm.kernels.native import cpu_flags
        from edgellm.perf.hardware import cpu_model_name
        report["cpu"], report["cpu_flags"] = cpu_model_name(), cpu_flags()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def print_validation(report: dict) -> None:
    print("| model | format | kind | threads | context | batch | predicted | measured | error | load factor | "
          "error, as `plan` predicts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["cases"]:
        unit = "ms" if r["metric"] == "ttft_s" else "tok/s"
        scale = 1000 if unit == "ms" else 1
        contended = " (contended)" if r.get("contended") else ""  # no run free of a neighbour: see measure.py
        plain = 100 * (r["predicted_uncorrected"] - r["measured"]) / r["measured"]
        print(f"| {r['model']} | {r['format']} | {r['kind']} | {r['threads']} | {r['context']} | {r['batch']} | "
              f"{r['predicted'] * scale:.1f} {unit} | {r['measured'] * scale:.1f} {unit}{contended} | "
              f"{r['error_pct']:+.1f}% | {r['load_factor']:.2f} | {plain:+.1f}% |")
    print("\n| model | format | memory | predicted | measured | error |\n|---|---|---|---|---|---|")
    for m in report["memory"]:
        print(f"| {m['model']} | {m['format']} | {m['what']} | {m['predicted']:.0f} | {m['measured']:.0f} | "
              f"{m['error_pct']:+.2f}% |")
    if report.get("external"):
        print("\n| device | model | format | published decode tok/s | predicted | error | source |\n"
              "|---|---|---|---|---|---|---|")
        for e in report["external"]:
            print(f"| {e['device']} | {e['model']} | {e['format']} | {e['value']} | {e['predicted']:.1f} | "
                  f"{e['error_pct']:+.1f}% | {e['source']} |")
    s = report["summary"]
    print(f"\n{s['cases']} cases: median |error| {s.get('median_abs_error_pct', 0):.1f}%, p90 "
          f"{s.get('p90_abs_error_pct', 0):.1f}%, max {s.get('max_abs_error_pct', 0):.1f}%, "
          f"{s.get('within_25_pct', 0)} within 25%; memory max |error| {s.get('memory_max_abs_error_pct', 0):.2f}%")
    if "summary_uncorrected" in report:  # what `edgellm plan` itself predicts: the profile as calibrated
        u = report["summary_uncorrected"]
        print(f"as `edgellm plan` predicts (no load correction): median |error| "
              f"{u.get('median_abs_error_pct', 0):.1f}%, max {u.get('max_abs_error_pct', 0):.1f}%, "
              f"{u.get('within_25_pct', 0)} within 25%")


def cmd_devices(args: argparse.Namespace) -> None:
    from edgellm.perf.catalog import DEVICES
    from edgellm.perf.profile import default_profile_path

    here = "calibrated: " + str(default_profile_path()) if default_profile_path().exists() else \
        "not calibrated (run `edgellm plan calibrate`)"
    print(f"{'this machine':<16} measured, {here}")
    for key, d in DEVICES.items():
        r = d.rates(None)
        print(f"{key:<16} {d.kind}: {d.name}, {d.memory_bytes / 1e9:.0f} GB at {r.dram_gbs:.0f} GB/s, "
              f"{d.extra['peak_tflops']} TFLOPS, {d.power_w or '?'} W — {d.source}")


def cmd_models(args: argparse.Namespace) -> None:
    from edgellm.perf.catalog import MODELS
    from edgellm.perf.costmodel import ModelSpec

    for key, config in MODELS.items():
        spec = ModelSpec.from_config(config, key)
        moe = f", MoE {spec.experts_per_token}/{spec.experts}" if spec.is_moe else ""
        print(f"{key:<16} {spec.parameters / 1e9:7.3f}B ({spec.active_parameters / 1e9:.3f}B active){moe}")
