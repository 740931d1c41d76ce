"""CPU model benchmark: transformers eager, ONNX Runtime on transformers' export, deberta_fast fp32 and bf16, and
the GEMM floor, in one process, interleaved.

    python bench/bench_cpu_model.py               # the four workloads of issue 15 (DeBERTa-v3-base shape)
    python bench/bench_cpu_model.py --quick       # the same columns at small shapes, one minute
    deberta-fast bench --cases cpu_model          # the same, as a case of the suite

Workloads (hidden 768, 12 heads, FFN 3072, vocab 128100, position_buckets 256, p2c|c2p, share_att_key,
norm_rel_ebd layer_norm, random weights, seed 0 for every column):
  fwd_L512      forward B=1 L=512, 12 layers
  fwd_B8_pad    forward B=8 L=128, 12 layers; rows 1..7 have 64 real tokens then right padding (7 rows half padded)
  fwd_L2048     forward B=1 L=2048, 2 layers
  train_L512    train-mode forward + backward B=1 L=512, 12 layers, dropout on (hidden 0.1, attention 0.1),
                loss mean(last_hidden_state²); gradients cleared after each step as each library's training
                loop does (transformers: zero_grad(set_to_none=True); deberta_fast: models.embedding.zero_grad,
                which keeps the word embedding's .grad and zeroes it in place)

Columns:
  transformers        transformers' DebertaV2Model, eager
  onnxruntime         ONNX Runtime (CPUExecutionProvider, all graph optimisations, intra-op threads = torch's)
                      on transformers' model exported with torch.onnx.export (TorchScript exporter, opset 17);
                      forward workloads only (ORT has no training path here)
  deberta_fast        the same weights on deberta_fast (patch_deberta, backend auto = the native CPU op), fp32
  deberta_fast_bf16   forward: the same model cast to bfloat16; train: the fp32 model stepped under
                      torch.autocast("cpu", bfloat16) (bf16 GEMMs and attention, fp32 weights and LayerNorms)
  gemm_floor          the model's linear layers alone at the workload's shapes: per layer q, k, v, output (768 ->
                      768), FFN in (768 -> 3072) and out (3072 -> 768) over B·L tokens, plus the two shared position
                      projections over the 2·256 relative embeddings, timed with F.linear; for the train workload
                      also each linear's two backward GEMMs (grad input, grad weight) timed with torch.mm. Attention
                      score GEMMs, softmax, LayerNorm, GELU and the embeddings are not in it: it is the time no
                      implementation of this model can go below with torch's GEMM on this CPU.

Times are medians over repeats; each repeat runs every column once in turn (interleaved), so drifting machine load
hits every column alike. Peak memory is measured in a fresh subprocess per column: the growth of the process's
peak resident set (Linux VmHWM, reset just before) during one call, after the model (or ORT session) is built and
loaded and has run once at B=1, L=8 (so one-time lazy initialisation is not counted, while an ORT arena that has to
grow for the real shape is). RSS counts every allocator alike (torch's, ONNX Runtime's arena, oneDNN scratch), which is why it is used
rather than torch's allocator statistics; the weights themselves are not in the growth.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from . import harness
from ..models.embedding import zero_grad
from .model import V3_BASE

COLUMNS = ("transformers", "onnxruntime", "deberta_fast", "deberta_fast_bf16", "gemm_floor")


def workloads(quick: bool) -> list[dict]:
    """Each workload: name, batch, length, layers, train, padded (real length of rows 1.. or None)."""
    if quick:
        return [
            dict(name="fwd_L128", batch=1, length=128, layers=2, train=False, padded=None),
            dict(name="fwd_B4_pad", batch=4, length=64, layers=2, train=False, padded=32),
            dict(name="fwd_L256", batch=1, length=256, layers=1, train=False, padded=None),
            dict(name="train_L128", batch=1, length=128, layers=2, train=True, padded=None),
        ]
    return [
        dict(name="fwd_L512", batch=1, length=512, layers=12, train=False, padded=None),
        dict(name="fwd_B8_pad", batch=8, length=128, layers=12, train=False, padded=64),
        dict(name="fwd_L2048", batch=1, length=2048, layers=2, train=False, padded=None),
        dict(name="train_L512", batch=1, length=512, layers=12, train=True, padded=None),
    ]


def make_inputs(work: dict) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch, length = work["batch"], work["length"]
    input_ids = torch.randint(1, V3_BASE["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if work["padded"] is not None:
        mask[1:, work["padded"]:] = 0
        input_ids[1:, work["padded"]:] = 0  # the pad id
    return {"input_ids": input_ids, "attention_mask": mask}


def transformers_model(layers: int, train: bool):
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    torch.manual_seed(0)
    config = DebertaV2Config(num_hidden_layers=layers, **V3_BASE)
    model = hf.DebertaV2Model(config)
    return model.train() if train else model.eval()


def fast_model(reference, dtype=torch.float32):
    import deberta_fast

    model = deberta_fast.patch_deberta(copy.deepcopy(reference))
    return model.to(dtype=dtype)


def export_onnx(model, inputs: dict, path: str) -> None:
    """transformers' model through torch.onnx.export (TorchScript exporter), dynamic batch and length."""
    names = ["input_ids", "attention_mask"]
    axes = {name: {0: "batch", 1: "length"} for name in names}
    axes["last_hidden_state"] = {0: "batch", 1: "length"}

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' Python-side size checks
        torch.onnx.export(LastHidden(model.eval()), (inputs["input_ids"], inputs["attention_mask"]), path,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def linear_shapes(work: dict) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of every linear layer of one forward."""
    tokens = work["batch"] * work["length"]
    hidden, ffn, slots = V3_BASE["hidden_size"], V3_BASE["intermediate_size"], 2 * V3_BASE["position_buckets"]
    per_layer = [(tokens, hidden, hidden)] * 4 + [(tokens, hidden, ffn), (tokens, ffn, hidden)]
    per_layer += [(min(slots, 2 * work["length"]), hidden, hidden)] * 2  # shared pos projections of key / query
    return per_layer * work["layers"]


def gemm_floor_fn(work: dict):
    """One call runs every linear GEMM of the workload (and, in train mode, its two backward GEMMs)."""
    generator = torch.Generator().manual_seed(2)
    operands = {}
    for shape in set(linear_shapes(work)):
        tokens, fan_in, fan_out = shape
        operands[shape] = (torch.randn(tokens, fan_in, generator=generator),
                           torch.randn(fan_out, fan_in, generator=generator), torch.randn(fan_out, generator=generator),
                           torch.randn(tokens, fan_out, generator=generator))
    shapes = linear_shapes(work)
    train = work["train"]

    def run(other_inputs=None):  # always the workload's GEMMs
        with torch.no_grad():
            for shape in shapes:
                x, weight, bias, grad = operands[shape]
                torch.nn.functional.linear(x, weight, bias)
                if train:
                    torch.mm(grad, weight)      # grad input [T, in]
                    torch.mm(grad.t(), x)       # grad weight [out, in]

    return run


def column_fn(column: str, work: dict, inputs: dict, onnx_dir: str):
    """A callable running one call of ``column`` on ``work``, or None when the column has no such workload."""
    train = work["train"]
    if column == "gemm_floor":
        return gemm_floor_fn(work)
    if train and column == "onnxruntime":
        return None
    reference = transformers_model(work["layers"], train)
    if column == "onnxruntime":
        import numpy as np

        path = os.path.join(onnx_dir, f"layers{work['layers']}.onnx")  # dynamic batch and length: one per depth
        if not os.path.exists(path):
            export_onnx(reference, inputs, path)
        session = ort_session(path)
        feeds = {k: np.ascontiguousarray(v.numpy()) for k, v in inputs.items()}

        def ort_run(other_inputs=None):
            given = feeds if other_inputs is None else {k: v.numpy() for k, v in other_inputs.items()}
            return session.run(None, given)

        return ort_run
    if column == "transformers":
        model = reference
    else:
        cast = column == "deberta_fast_bf16" and not train  # bf16 training: autocast over fp32 weights
        model = fast_model(reference, torch.bfloat16 if cast else torch.float32)
        del reference
    if train:
        autocast = column == "deberta_fast_bf16"

        def step(other_inputs=None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hidden = model(**(other_inputs or inputs)).last_hidden_state
            hidden.float().pow(2).mean().backward()
            if column == "transformers":
                model.zero_grad(set_to_none=True)
            else:  # deberta_fast's training loop: the word embedding's .grad is kept, zeroed in place
                zero_grad(model)

        return step

    def forward(other_inputs=None):
        with torch.inference_mode():
            return model(**(other_inputs or inputs)).last_hidden_state

    return forward


def peak_memory_mib(column: str, work: dict, onnx_dir: str) -> float | None:
    """Peak-RSS growth of one call in a fresh subprocess (after building and one warm-up-free load)."""
    command = [sys.executable, "-m", "deberta_fast.benchmark.cpu_model", "--memory-worker",
               json.dumps([column, work, onnx_dir, torch.get_num_threads()])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  memory of {column} / {work['name']} failed: {result.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_worker(spec: str) -> None:
    column, work, onnx_dir, threads = json.loads(spec)
    torch.set_num_threads(threads)
    fn = column_fn(column, work, make_inputs(work), onnx_dir)
    if fn is None:
        print(json.dumps(None))
        return
    # One call at a tiny shape first, so one-time lazy initialisation (oneDNN kernels, thread pools, ORT's
    # first arena chunk) is not counted; memory the real shape needs beyond that (ORT's arena growing
    # included) is.
    fn(make_inputs({**work, "batch": 1, "length": 8, "padded": None}))
    print(json.dumps(harness.peak_rss_growth_mib(fn)))


def run(quick: bool = False, repeats: int | None = None, memory: bool = True, names=None,
        columns=COLUMNS) -> list[dict]:
    repeats = repeats or (2 if quick else 5)
    facts = harness.machine_facts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="deberta_fast_onnx_") as onnx_dir:
        for work in workloads(quick):
            if names and work["name"] not in names:
                continue
            inputs = make_inputs(work)
            fns = {}
            for column in columns:
                started = time.perf_counter()
                try:
                    fn = column_fn(column, work, inputs, onnx_dir)
                    if fn is not None:
                        fn()  # warm-up (and the native op's first build)
                        fns[column] = fn
                except Exception as error:  # a column that cannot run is reported, not fatal
                    print(f"  {work['name']} / {column}: {type(error).__name__}: {str(error).splitlines()[0][:200]}",
                          file=sys.stderr)
                print(f"  {work['name']} / {column}: ready ({time.perf_counter() - started:.1f} s)", file=sys.stderr,
                      flush=True)
            times = {column: [] for column in fns}
            for _ in range(repeats):
                for column, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[column].append(time.perf_counter() - start)
            del fns
            medians = {c: statistics.median(t) for c, t in times.items()}
            for column in columns:
                seconds = medians.get(column)
                row = {"case": "cpu_model", "workload": work["name"], "batch": work["batch"],
                       "length": work["length"], "layers": work["layers"],
                       "mode": "fwd+bwd" if work["train"] else "fwd", "provider": column, "median_s": seconds,
                       "speedup_vs_transformers": (medians["transformers"] / seconds)
                       if seconds and medians.get("transformers") else None,
                       "vs_gemm_floor": (seconds / medians["gemm_floor"])
                       if seconds and medians.get("gemm_floor") else None,
                       "repeats": repeats}
                if memory and seconds is not None and column != "gemm_floor":
                    row["peak_mib"] = peak_memory_mib(column, work, onnx_dir)
                rows.append({**row, **facts})
                if seconds is not None:
                    print(f"  {work['name']} / {column}: {seconds:.3f} s", file=sys.stderr, flush=True)
    return rows


TABLE_COLUMNS = ("workload", "provider", "median_s", "speedup_vs_transformers", "vs_gemm_floor", "peak_mib")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (2 layers), 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; --quick 2)")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of the workload names")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--csv", default=None, help="CSV path (default bench/results/cpu_model[_quick].csv)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        return _memory_worker(args.memory_worker)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats: expected an integer >= 1; got {args.repeats}")
    names = None
    if args.workloads:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
        known = [w["name"] for w in workloads(args.quick)]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"--workloads: unknown {unknown}; expected a subset of {known}")
    rows = run(args.quick, args.repeats, not args.no_memory, names)
    path = args.csv or os.path.join(harness.results_dir(), f"cpu_model{'_quick' if args.quick else ''}.csv")
    harness.write_csv(rows, path)
    print(f"machine: {rows[0]['machine']}; torch {rows[0]['torch']}, transformers {rows[0]['transformers']}, "
          f"git {rows[0]['git']}")
    print(harness.format_table(rows, TABLE_COLUMNS))
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
