"""CPU benchmark of disentangled attention: the native op (csrc/) against the reference, transformers' eager module
and torch's SDPA without positional terms; and full v3-base-shaped model forwards.

    python bench/bench_cpu_attention.py                 # everything (several minutes on 2 cores)
    python bench/bench_cpu_attention.py --quick         # fewer repetitions, no L=4096

Sections (B=1, H=12, D=64, 256 buckets, max_relative_positions 512, fp32, torch's default thread count):
  layer_op      the op alone on precomputed q/k/v (+ Pk/Pq): native, reference, SDPA on the same q/k/v without
                positions; forward, and forward+backward for native vs reference at L=512/2048.
  layer_module  one DisentangledSelfAttention module (projections included): transformers eager vs deberta_fast
                with the cpu and reference backends (same weights).
  model         DebertaV2Model forward, hidden 768 / 12 heads / intermediate 3072 / vocab 128100, random weights:
                L=512 with 12 layers and L=2048 with 2 layers; transformers eager vs deberta_fast reference vs cpu.
                Peak memory: growth of the peak RSS during one forward, each measured in a fresh subprocess.
Times are medians of interleaved repetitions (providers take turns, so load from other processes hits all alike).
Prints a table and writes bench/results/cpu_attention_<date>.csv with the machine, torch version and git sha.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM, BUCKETS, MAX_REL = 12, 64, 256, 512


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of each callable; the callables take turns in every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def v3_config(layers: int, length: int):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=layers, num_attention_heads=HEADS,
        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=max(512, length), type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True,
        pos_att_type="p2c|c2p", position_buckets=BUCKETS, max_relative_positions=MAX_REL, share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False,
    )


def layer_op_rows(lengths, repeats, backward_lengths):
    from deberta_fast.ops import disentangled_attention
    from deberta_fast.ops.positions import RelativePositionSpec, softmax_scale

    spec = RelativePositionSpec(c2p=True, p2c=True, position_buckets=BUCKETS, max_relative_positions=MAX_REL)
    scale = softmax_scale(HEAD_DIM, 3)
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        # The model's layout: heads split out of [B, L, H * D] as strided views.
        q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM, generator=generator).transpose(1, 2) for _ in range(3))
        pk, pq = (torch.randn(1, 2 * BUCKETS, HEADS, HEAD_DIM, generator=generator).transpose(1, 2) for _ in range(2))

        def op(backend):
            return lambda: disentangled_attention(q, k, v, pk, pq, None, spec=spec, softmax_scale=scale,
                                                  backend=backend)

        with torch.no_grad():
            medians = interleaved_medians(
                {"native": op("cpu"), "reference": op("reference"),
                 "sdpa_no_positions": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)},
                repeats if length < 4096 else max(2, repeats // 2),
            )
        for name, seconds in medians.items():
            rows.append(dict(section="layer_op", length=length, layers=1, provider=name, pass_="fwd",
                             median_s=seconds, ratio_to="sdpa_no_positions",
                             ratio=seconds / medians["sdpa_no_positions"]))
        if length in backward_lengths:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pq)]
            grad = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)

            def fwd_bwd(backend):
                def run():
                    out, _ = disentangled_attention(*leaves, None, spec=spec, softmax_scale=scale, backend=backend)
                    torch.autograd.grad(out, leaves, grad)
                return run

            medians = interleaved_medians({"native": fwd_bwd("cpu"), "reference": fwd_bwd("reference")}, repeats)
            for name, seconds in medians.items():
                rows.append(dict(section="layer_op", length=length, layers=1, provider=name, pass_="fwd+bwd",
                                 median_s=seconds, ratio_to="reference", ratio=seconds / medians["reference"]))
    return rows


def layer_module_rows(lengths, repeats):
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    from deberta_fast.models.attention import DisentangledSelfAttention

    rows = []
    for length in lengths:
        config = v3_config(1, length)
        torch.manual_seed(0)
        eager = hf.DisentangledSelfAttention(config).eval()
        fast = DisentangledSelfAttention(config).eval()
        fast.load_state_dict(eager.state_dict())
        hidden = torch.randn(1, length, config.hidden_size)
        rel = torch.nn.functional.layer_norm(torch.randn(2 * BUCKETS, config.hidden_size), (config.hidden_size,))
        mask = torch.ones(1, length, dtype=torch.long)
        pair_mask = (mask[:, None, :, None] * mask[:, None, None, :])
        relative_pos = hf.build_relative_position(hidden, hidden, bucket_size=BUCKETS, max_position=MAX_REL)

        def run_fast(backend):
            def run():
                fast.backend = backend
                fast(hidden, mask, rel_embeddings=rel)
            return run

        fns = {"transformers_eager": lambda: eager(hidden, pair_mask, relative_pos=relative_pos, rel_embeddings=rel),
               "deberta_fast_cpu": run_fast("cpu"), "deberta_fast_reference": run_fast("reference")}
        with torch.no_grad():
            medians = interleaved_medians(fns, repeats if length < 4096 else max(2, repeats // 2))
        for name, seconds in medians.items():
            rows.append(dict(section="layer_module", length=length, layers=1, provider=name, pass_="fwd",
                             median_s=seconds, ratio_to="transformers_eager",
                             ratio=seconds / medians["transformers_eager"]))
    return rows


def build_model(provider: str, layers: int, length: int):
    """A seeded v3-base-shaped model: transformers' class, or deberta_fast's pinned to one backend."""
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    from deberta_fast.models import DebertaV2Model, set_attention_backend

    torch.manual_seed(0)
    config = v3_config(layers, length)
    if provider == "transformers_eager":
        return hf.DebertaV2Model(config).eval()
    model = DebertaV2Model(config).eval()
    return set_attention_backend(model, provider.removeprefix("deberta_fast_"))


def model_inputs(length: int):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128100, (1, length), generator=generator), torch.ones(1, length, dtype=torch.long)


MODEL_PROVIDERS = ("transformers_eager", "deberta_fast_reference", "deberta_fast_cpu")


def measure_peak_memory(provider: str, layers: int, length: int) -> float:
    """Peak RSS growth (MiB) of one forward, in a fresh process: model built and warmed up on a 16-token input
    (kernels compiled and loaded; a full-size warm-up would leave the native op's reusable workspace resident and
    hide it), freed heap memory handed back to the OS (malloc_trim), the kernel's peak RSS counter reset
    (/proc/self/clear_refs), one forward, then VmHWM - VmRSS(before)."""
    script = f"""
import ctypes, gc, json, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_cpu_attention import build_model, model_inputs
model = build_model({provider!r}, {layers}, {length}); ids, mask = model_inputs({length})
with torch.no_grad():
    model(input_ids=ids[:, :16], attention_mask=mask[:, :16])
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key): return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f: f.write("5")
before = status("VmRSS:")
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
print(json.dumps(dict(peak_kib=status("VmHWM:") - before)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {provider} at L={length} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"] / 1024.0


def model_rows(cases, repeats, memory: bool):
    rows = []
    for length, layers in cases:
        ids, mask = model_inputs(length)
        models = {p: build_model(p, layers, length) for p in MODEL_PROVIDERS}
        state = models["transformers_eager"].state_dict()
        for p in MODEL_PROVIDERS[1:]:
            models[p].load_state_dict(state)
        with torch.no_grad():
            outputs = {p: m(input_ids=ids, attention_mask=mask).last_hidden_state for p, m in models.items()}
            max_diff = max((outputs[p] - outputs["transformers_eager"]).abs().max().item() for p in MODEL_PROVIDERS)
            medians = interleaved_medians(
                {p: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for p, m in models.items()}, repeats,
                warmup=0)
        del models, outputs
        gc.collect()
        for provider, seconds in medians.items():
            rows.append(dict(section="model", length=length, layers=layers, provider=provider, pass_="fwd",
                             median_s=seconds, ratio_to="transformers_eager",
                             ratio=seconds / medians["transformers_eager"],
                             peak_mib=measure_peak_memory(provider, layers, length) if memory else None,
                             max_abs_diff_vs_eager=max_diff))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, no L=4096")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--sections", default="layer_op,layer_module,model")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    lengths = (512, 2048) if args.quick else (512, 2048, 4096)
    sections = set(args.sections.split(","))

    from deberta_fast.ops import attention_cpu

    status = attention_cpu.extension()
    if not status.ok:
        sys.exit(f"the native CPU op is not available: {status.error}")

    machine = dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                   capability=torch.backends.cpu.get_cpu_capability(), git_sha=git_sha(),
                   load_avg_start=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = []
    if "layer_op" in sections:
        rows += layer_op_rows(lengths, repeats, backward_lengths=(512, 2048))
    if "layer_module" in sections:
        rows += layer_module_rows(lengths, repeats)
    if "model" in sections:
        rows += model_rows(((512, 12), (2048, 2)), max(3, (repeats + 1) // 2), memory=not args.no_memory)
    machine["load_avg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print(f"# {machine['cpu']} | {machine['threads']} threads | torch {machine['torch']} ({machine['capability']}) | "
          f"git {machine['git_sha']} | load avg {machine['load_avg_start']} -> {machine['load_avg_end']}")
    header = f"{'section':<13}{'L':>6}{'layers':>7}  {'provider':<24}{'pass':<8}{'median ms':>11}  {'ratio':>7} {'vs':<20}{'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        peak = row.get("peak_mib")
        print(f"{row['section']:<13}{row['length']:>6}{row['layers']:>7}  {row['provider']:<24}{row['pass_']:<8}"
              f"{row['median_s'] * 1e3:>11.1f}  {row['ratio']:>7.3f} {row['ratio_to']:<20}"
              f"{'' if peak is None else f'{peak:.0f}':>9}")

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"cpu_attention_{stamp}.csv"
    fields = ["section", "length", "layers", "provider", "pass", "median_s", "ratio", "ratio_to", "peak_mib",
              "max_abs_diff_vs_eager", *machine.keys()]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            record = {("pass" if k == "pass_" else k): v for k, v in row.items()}
            writer.writerow({**record, **machine})
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
