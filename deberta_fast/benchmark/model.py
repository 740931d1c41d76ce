"""Full-model forward of a DeBERTa-v3-base-shaped model: transformers eager vs deberta_fast backends.

    python bench/bench_model.py                 # L=512 (12 layers) and L=2048 (2 layers), B=1
    python bench/bench_model.py --quick         # a short smoke run
    python bench/bench_model.py --shapes 1024:4 --repeats 3
    python -m deberta_fast.benchmark.model ...  # the same, from an installed package

Shape: hidden 768, 12 heads, intermediate 3072, vocab 128100, position_buckets 256, random weights (the same
seed for every provider). Times are medians measured in this process, so ratios come from one run; peak
memory is the growth of the peak resident set during one forward in a fresh subprocess per provider (CPU) or
torch.cuda.max_memory_allocated (CUDA). Prints a markdown table and writes CSV (default
bench/results/model_forward_<device>.csv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from . import harness

V3_BASE = dict(vocab_size=128100, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
               max_position_embeddings=512, relative_attention=True, position_buckets=256,
               max_relative_positions=-1, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
               position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu")


def available_providers(device: str) -> list[str]:
    """transformers, and every deberta_fast backend that can run a forward on ``device``."""
    from deberta_fast.ops import attention

    providers = ["transformers", "deberta_fast[reference]"]
    probe = torch.zeros(1, 1, 2, 64, device=device)
    for candidate in attention.CANDIDATES:
        if candidate.name == "reference":
            continue
        call = (probe, probe, probe, None, None, None, None, 0.125, 0.0, False, 0)
        if not candidate.reasons(*call) and candidate.device_type in (None, device):
            providers.append(f"deberta_fast[{candidate.name}]")
    return providers


def build_model(provider: str, layers: int, device: str, dtype: torch.dtype):
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    import deberta_fast

    torch.manual_seed(0)
    model = hf.DebertaV2Model(DebertaV2Config(num_hidden_layers=layers, **V3_BASE))
    if provider != "transformers":
        deberta_fast.patch_deberta(model)
        deberta_fast.set_attention_backend(model, provider[len("deberta_fast["):-1])
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(length: int, batch: int, device: str):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, V3_BASE["vocab_size"], (batch, length), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def forward_fn(model, inputs):
    def run():
        with torch.inference_mode():
            return model(**inputs).last_hidden_state

    return run


def peak_memory_mib(provider, length, layers, batch, device, dtype) -> float | None:
    """Peak memory of one forward: a fresh subprocess on CPU, max_memory_allocated on CUDA."""
    if device == "cuda":
        model = build_model(provider, layers, device, dtype)
        inputs = make_inputs(length, batch, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_fn(model, inputs)()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    command = [sys.executable, "-m", "deberta_fast.benchmark.model", "--memory-worker",
               json.dumps([provider, length, layers, batch, str(dtype).split(".")[-1]])]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_worker(spec: str) -> None:
    provider, length, layers, batch, dtype_name = json.loads(spec)
    model = build_model(provider, layers, "cpu", getattr(torch, dtype_name))
    inputs = make_inputs(length, batch, "cpu")
    print(json.dumps(harness.peak_rss_growth_mib(forward_fn(model, inputs))))


def parse_shapes(text: str, option: str = "--shapes") -> list[tuple[int, int]]:
    """[(length, layers)] from "512:12,2048:2"; ValueError naming ``option``."""
    shapes = []
    for item in text.split(","):
        try:
            length, layers = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"{option}: expected comma-separated LENGTH:LAYERS pairs such as 512:12; got {item!r}")
        if length < 1 or layers < 1:
            raise ValueError(f"{option}: LENGTH and LAYERS must be >= 1; got {item!r}")
        shapes.append((length, layers))
    return shapes


def run(shapes, batch, repeats, device, dtype, providers=None, memory=True) -> list[dict]:
    providers = providers or available_providers(device)
    facts = harness.machine_facts()
    rows = []
    for length, layers in shapes:
        inputs = make_inputs(length, batch, device)
        baseline = None
        for provider in providers:
            model = build_model(provider, layers, device, dtype)
            seconds = harness.median_seconds(forward_fn(model, inputs), repeats=repeats, warmup=1)
            del model
            baseline = seconds if provider == "transformers" else baseline
            row = {"case": "model_forward", "length": length, "layers": layers, "batch": batch,
                   "dtype": str(dtype).split(".")[-1], "provider": provider, "median_s": seconds,
                   "speedup_vs_transformers": (baseline / seconds) if baseline else None}
            if memory:
                row["peak_mib"] = peak_memory_mib(provider, length, layers, batch, device, dtype)
            rows.append({**row, **facts})
            print(f"  L={length} layers={layers} {provider}: {seconds:.3f} s", file=sys.stderr, flush=True)
    return rows


TABLE_COLUMNS = ("length", "layers", "provider", "median_s", "speedup_vs_transformers", "peak_mib")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="512:12,2048:2",
                        help="comma-separated LENGTH:LAYERS pairs (default 512:12,2048:2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per provider; the median is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="where to run (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="one small shape (256:2), 2 repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--csv", default=None, help="CSV path (default bench/results/model_forward_<device>.csv)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        return _memory_worker(args.memory_worker)
    try:
        shapes = [(256, 2)] if args.quick else parse_shapes(args.shapes)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    repeats = 2 if args.quick else args.repeats
    rows = run(shapes, args.batch, repeats, args.device, getattr(torch, args.dtype), memory=not args.no_memory)
    path = args.csv or os.path.join(harness.results_dir(), f"model_forward_{args.device}{'_quick' if args.quick else ''}.csv")
    harness.write_csv(rows, path)
    print(f"machine: {rows[0]['machine']}; torch {rows[0]['torch']}, transformers {rows[0]['transformers']}, "
          f"git {rows[0]['git']}")
    print(harness.format_table(rows, TABLE_COLUMNS))
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
