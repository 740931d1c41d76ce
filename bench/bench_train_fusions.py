"""Train step with and without the fused token-wise blocks, in one process, interleaved.

    python bench/bench_train_fusions.py                      # B=1 L=512, 12 layers, 5 repetitions
    python bench/bench_train_fusions.py --layers 2 --repeats 3
    python bench/bench_train_fusions.py --blocks             # one block's forward + backward, many repetitions

Columns (same weights, v3-base shape, dropout on: hidden 0.1, attention 0.1, loss mean(last_hidden_state²)):
  transformers    transformers' DebertaV2Model, eager
  unfused         deberta_fast (native attention op) with transformers' SelfOutput / Intermediate / Output blocks:
                  addmm -> dropout -> add -> LayerNorm, addmm -> gelu (what the train step ran before the fusions)
  fused           deberta_fast as shipped: residual_layernorm and bias_gelu (deberta_fast.models.output_blocks)

Each repetition runs every column once in turn, so drifting machine load hits them alike; the table gives medians
and each column's ratio to transformers and to unfused. Writes bench/results/train_fusions.csv.

``--blocks`` times the blocks alone instead (forward + backward of one attention-output block, one intermediate and
one FFN-output block at B=1 L=512, v3-base widths, train mode, transformers' class against the fused one on the same
weights, interleaved, --repeats 50 by default): the part of the step the fusions change, without the GEMM-bound rest.
On a loaded machine ``--blocks --threads 1 --clock cpu`` (this process's CPU time) is far steadier than wall time.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time

import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from deberta_fast.benchmark import cpu_model
from deberta_fast.models.output_blocks import DebertaV2Intermediate, DebertaV2Output, DebertaV2SelfOutput

UNFUSE = {DebertaV2SelfOutput: hf.DebertaV2SelfOutput, DebertaV2Intermediate: hf.DebertaV2Intermediate,
          DebertaV2Output: hf.DebertaV2Output}


def unfused(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its fused blocks switched back to transformers' classes (same parameters), in place."""
    switched = 0
    for module in model.modules():
        if type(module) in UNFUSE:
            module.__class__ = UNFUSE[type(module)]
            switched += 1
    if not switched:
        raise TypeError("the model has no deberta_fast output blocks to switch back")
    return model


def train_step(model, inputs):
    def step():
        model(**inputs).last_hidden_state.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def block_columns(length: int):
    """(name, transformers' block, fused block, inputs) of the three token-wise blocks of one v3-base layer."""
    from transformers import DebertaV2Config

    from deberta_fast.benchmark.model import V3_BASE

    config = DebertaV2Config(num_hidden_layers=1, **V3_BASE)
    torch.manual_seed(0)
    hidden, ffn = config.hidden_size, config.intermediate_size
    cases = []
    for name, cls, width, two_inputs in (("attention output", hf.DebertaV2SelfOutput, hidden, True),
                                         ("intermediate", hf.DebertaV2Intermediate, hidden, False),
                                         ("FFN output", hf.DebertaV2Output, ffn, True)):
        plain = cls(config).train()
        fused = copy.deepcopy(plain)
        fused.__class__ = {v: k for k, v in UNFUSE.items()}[cls]
        inputs = [torch.randn(1, length, width, requires_grad=True)]
        if two_inputs:
            inputs.append(torch.randn(1, length, hidden, requires_grad=True))
        cases.append((name, plain, fused, inputs))
    return cases


def time_blocks(length: int, repeats: int, clock: str = "wall") -> list[dict]:
    timer = time.process_time if clock == "cpu" else time.perf_counter
    rows = []
    for name, plain, fused, inputs in block_columns(length):
        def step(block):
            out = block(*inputs)
            out.backward(torch.ones_like(out))

        times = {"transformers": [], "fused": []}
        for _ in range(3):
            step(plain), step(fused)
        for _ in range(repeats):
            for column, block in (("transformers", plain), ("fused", fused)):
                start = timer()
                step(block)
                times[column].append(timer() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        rows.append({"block": name, "transformers_median_ms": f"{1e3 * med['transformers']:.3f}",
                     "fused_median_ms": f"{1e3 * med['fused']:.3f}",
                     "speedup_median": f"{med['transformers'] / med['fused']:.3f}",
                     "transformers_min_ms": f"{1e3 * low['transformers']:.3f}", "fused_min_ms": f"{1e3 * low['fused']:.3f}",
                     "speedup_min": f"{low['transformers'] / low['fused']:.3f}", "threads": torch.get_num_threads(),
                     "clock": clock})
    print(f"one block, forward + backward (GEMMs included), B=1 L={length}, v3-base widths, train mode, "
          f"{repeats} interleaved repetitions, {torch.get_num_threads()} threads, {clock} clock")
    print("| block | transformers ms (median / min) | fused ms (median / min) | speed-up (median / min) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['transformers_median_ms']} / {r['transformers_min_ms']} | {r['fused_median_ms']} / "
              f"{r['fused_min_ms']} | {r['speedup_median']}x / {r['speedup_min']}x |")
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None, help="5 for the train step, 50 with --blocks")
    parser.add_argument("--blocks", action="store_true", help="time the three token-wise blocks alone")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier on a loaded machine; "
                             "meaningful with --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/train_fusions[_blocks].csv)")
    args = parser.parse_args(argv)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.blocks:
        rows = time_blocks(args.length, args.repeats or 50, args.clock)
        write_csv(rows, args.out or os.path.join(results, "train_fusions_blocks.csv"))
        return
    args.repeats = args.repeats or 5
    work = dict(name="train", batch=1, length=args.length, layers=args.layers, train=True, padded=None)
    inputs = cpu_model.make_inputs(work)
    reference = cpu_model.transformers_model(args.layers, train=True)
    fused = cpu_model.fast_model(reference).train()
    steps = {
        "transformers": train_step(reference, inputs),
        "unfused": train_step(unfused(copy.deepcopy(fused)), inputs),
        "fused": train_step(fused, inputs),
    }
    for step in steps.values():  # warm-up: native op build / load, allocator, oneDNN primitives
        step()
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = timer()
            step()
            times[name].append(timer() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"train step B=1 L={args.length}, {args.layers} layers, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repetitions, {args.clock} clock")
    print("| column | median s | vs transformers | vs unfused | all runs (s) |")
    print("|---|---|---|---|---|")
    rows = []
    for name, median in medians.items():
        to_hf, to_unfused = medians["transformers"] / median, medians["unfused"] / median
        runs = " ".join(f"{t:.3f}" for t in times[name])
        print(f"| {name} | {median:.3f} | {to_hf:.2f}x | {to_unfused:.2f}x | {runs} |")
        rows.append({"column": name, "layers": args.layers, "length": args.length, "median_s": f"{median:.4f}",
                     "speedup_vs_transformers": f"{to_hf:.3f}", "speedup_vs_unfused": f"{to_unfused:.3f}",
                     "runs_s": runs, "threads": torch.get_num_threads(), "clock": args.clock})
    # Per-repetition ratios: under drifting load the paired ratio is steadier than the ratio of medians.
    paired = [u / f for u, f in zip(times["unfused"], times["fused"])]
    print(f"paired unfused / fused per repetition: {' '.join(f'{r:.2f}' for r in paired)} "
          f"(median {statistics.median(paired):.2f})")
    write_csv(rows, args.out or os.path.join(results, "train_fusions.csv"))


if __name__ == "__main__":
    main()
