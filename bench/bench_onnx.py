"""ONNX Runtime on deberta_fast's export against ONNX Runtime on transformers' export of the same model.

    python bench/bench_onnx.py             # B=1: L=512 with 12 layers, L=2048 with 2 layers (several minutes)
    python bench/bench_onnx.py --quick     # L=128 / 256, 2 layers, 3 repetitions (a script check, about a minute)

Both models are DebertaV2Model in the DeBERTa-v3-base shape (hidden 768, 12 heads, intermediate 3072, vocab 128100,
position_buckets 256, max_relative_positions -1, share_att_key, no absolute positions) with the same seeded random
weights, exported with the same exporter (TorchScript by default; ``--exporter dynamo``) at a short example length
with dynamic batch and length axes, then run at the benchmark length: the graphs serve any length. Each ONNX Runtime
session: CPU provider, graph optimisation level ``--opt-level`` (all by default), ``--threads`` intra-op threads
(2 by default), one inter-op thread, sequential execution, no spin-waiting of idle threads (one session's spinning
threads would otherwise steal the cores of the next one in the interleaved loop). Times are medians of interleaved
repetitions (the two sessions take turns). Also reported: max |difference| of each export's output against the
PyTorch model. Prints a table and writes bench/results/onnx_<date>.csv with the machine, versions and git revision.
``--profile`` also runs ONNX Runtime's profiler on both sessions and prints, per export, the time by op type (each
node's fastest repetition, the least disturbed on a loaded machine; the warm-up run left out).

At L=2048 the default uses 2 layers (12 layers take minutes per repetition with transformers' export on 2 cores);
``--layers`` changes both.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from deberta_fast.benchmark import harness

OPT_LEVELS = ("disable", "basic", "extended", "all")


def v3_base_config(layers: int, vocab: int):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=vocab, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=512,
        type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True, pos_att_type="p2c|c2p",
        position_buckets=256, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False,
    )


def export(model, path: str, exporter: str, example_length: int = 16) -> None:
    # Batch 2: the dynamo exporter specialises a dimension whose example size is 1.
    input_ids = torch.randint(0, 100, (2, example_length))
    mask = torch.ones(2, example_length, dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
            shapes = {0: batch, 1: length}
            torch.onnx.export(model, (input_ids, mask), path, dynamo=True, input_names=names,
                              dynamic_shapes=(shapes, shapes), external_data=True, verbose=False)
        else:
            axes = {0: "batch", 1: "length"}
            torch.onnx.export(model, (input_ids, mask), path, dynamo=False, input_names=names,
                              dynamic_axes={name: axes for name in names}, opset_version=17)


def make_session(path: str, threads: int, opt_level: str, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench_case(length: int, layers: int, args, workdir: str) -> list[dict]:
    import transformers

    import deberta_fast

    config = v3_base_config(layers, args.vocab)
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(0, args.vocab, (1, length), generator=generator)
    mask = torch.ones(1, length, dtype=torch.long)
    feed = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}

    sessions, errors, export_s = {}, {}, {}
    for provider, model_class in (("transformers_ort", transformers.DebertaV2Model),
                                  ("deberta_fast_ort", deberta_fast.DebertaV2Model)):
        torch.manual_seed(0)  # same weights: deberta_fast's classes draw transformers' initialisation
        model = model_class(config).eval()
        path = os.path.join(workdir, f"{provider}_{layers}.onnx")
        start = time.perf_counter()
        export(model, path, args.exporter)
        export_s[provider] = time.perf_counter() - start
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=mask).last_hidden_state.numpy()
        del model
        gc.collect()
        prefix = os.path.join(workdir, f"profile_{provider}_{length}") if args.profile else None
        sessions[provider] = make_session(path, args.threads, args.opt_level, prefix)
        got = sessions[provider].run(None, feed)[0]
        errors[provider] = float(np.abs(got - expected).max())

    times = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, sess in sessions.items():
            gc.collect()
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    if args.profile:
        for name, sess in sessions.items():
            print_profile(f"{name}, L={length}, {layers} layers", sess.end_profiling())
    rows = []
    for name in sessions:
        rows.append(dict(
            case="model_forward_ort", length=length, layers=layers, batch=1, provider=name, exporter=args.exporter,
            opt_level=args.opt_level, threads=args.threads, repeats=args.repeats, median_s=medians[name],
            speedup_vs_transformers_ort=medians["transformers_ort"] / medians[name],
            max_abs_diff_vs_torch=errors[name], export_s=export_s[name],
        ))
    del sessions
    gc.collect()
    return rows


def print_profile(title: str, trace_path: str, top: int = 14) -> None:
    """Per op type: the sum over nodes of each node's fastest run (the first, warm-up run left out)."""
    import collections
    import json

    with open(trace_path) as handle:
        events = json.load(handle)
    runs, op_of = collections.defaultdict(list), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            runs[event["name"]].append(event["dur"])
            op_of[event["name"]] = event["args"]["op_name"]
    by_op = collections.Counter()
    for node, durations in runs.items():
        by_op[op_of[node]] += min(durations[1:] or durations) / 1e6
    print(f"ORT profile, {title}: {sum(by_op.values()):.3f} s in nodes; by op type:")
    for op, seconds in by_op.most_common(top):
        print(f"  {op:24s} {seconds:8.3f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L=128 and 256 with 2 layers, 3 repetitions")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 512 2048)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="layers per length, one value or one per length (default 12 at L<=512, else 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--opt-level", choices=OPT_LEVELS, default="all", help="ONNX Runtime graph optimisation")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--vocab", type=int, default=128100)
    parser.add_argument("--profile", action="store_true", help="print ONNX Runtime's profile of both sessions")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/onnx_<date>.csv)")
    args = parser.parse_args(argv)
    lengths = args.lengths or ([128, 256] if args.quick else [512, 2048])
    if args.layers is None:
        layers = [2 if args.quick or length > 512 else 12 for length in lengths]
    elif len(args.layers) == 1:
        layers = args.layers * len(lengths)
    elif len(args.layers) == len(lengths):
        layers = args.layers
    else:
        parser.error(f"--layers takes one value or one per length ({len(lengths)}); got {len(args.layers)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5

    import onnxruntime

    facts = harness.machine_facts()
    facts["onnxruntime"] = onnxruntime.__version__
    rows = []
    with tempfile.TemporaryDirectory(prefix="deberta_fast_onnx_") as workdir:
        for length, count in zip(lengths, layers):
            print(f"L={length}, {count} layers: exporting both models and timing ...", file=sys.stderr, flush=True)
            rows += bench_case(length, count, args, workdir)
    for row in rows:
        row.update(facts)
    print(f"machine: {facts['machine']}; torch {facts['torch']}, transformers {facts['transformers']}, "
          f"onnxruntime {facts['onnxruntime']}; exporter {args.exporter}, opt level {args.opt_level}, "
          f"{args.threads} ORT threads, {args.repeats} interleaved repetitions")
    print(harness.format_table(rows, ["length", "layers", "provider", "median_s", "speedup_vs_transformers_ort",
                                      "max_abs_diff_vs_torch"]))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out or os.path.join(harness.results_dir(), f"onnx_{stamp}.csv")
    harness.write_csv(rows, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
