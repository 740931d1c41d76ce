"""torch.compile vs eager on the CPU: a DeBERTa-v3-base-shaped model, forward and forward+backward.

    python bench/bench_compile.py                        # L=128 and L=512, 2 layers, B=1; fwd and fwd+bwd
    python bench/bench_compile.py --quick                # a short smoke run (small model)
    python bench/bench_compile.py --shapes 512:12 --modes fwd --repeats 9

Providers: transformers' DebertaV2Model and deberta_fast's (``patch_deberta``) on the native op (``cpu``) and on
the reference, each eager and ``torch.compile(model, fullgraph=True)`` (Inductor; transformers' model compiled
without fullgraph). Shape: hidden 768, 12 heads, intermediate 3072, vocab 128100, position_buckets 256, random
weights (one seed). fwd runs under no_grad in eval mode; fwd+bwd is a training step's loss.backward() in eval
mode (no dropout). Times are medians over interleaved repeats in this process after a warm-up call that also
measures the compile time. Prints a markdown table and writes CSV (default bench/results/compile_cpu.csv).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from deberta_fast.benchmark import harness

V3_BASE = dict(vocab_size=128100, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
               max_position_embeddings=512, relative_attention=True, position_buckets=256,
               max_relative_positions=-1, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
               position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu")
QUICK = dict(V3_BASE, vocab_size=1000, hidden_size=128, num_attention_heads=4, intermediate_size=256,
             position_buckets=64, max_position_embeddings=256)
PROVIDERS = ("transformers", "deberta_fast[cpu]", "deberta_fast[reference]")


def build(provider: str, layers: int, shape: dict):
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    import deberta_fast

    torch.manual_seed(0)
    model = hf.DebertaV2Model(DebertaV2Config(num_hidden_layers=layers, **shape)).eval()
    if provider != "transformers":
        deberta_fast.patch_deberta(model)
        deberta_fast.set_attention_backend(model, provider[len("deberta_fast["):-1])
    return model


def step(model, inputs, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            return model(**inputs).last_hidden_state
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).last_hidden_state.float().square().mean()
    loss.backward()
    return loss


def run(args) -> list[dict]:
    shape = QUICK if args.quick else V3_BASE
    facts = harness.machine_facts()
    rows = []
    for length, layers in args.shapes:
        generator = torch.Generator().manual_seed(1)
        inputs = {"input_ids": torch.randint(1, shape["vocab_size"], (args.batch, length), generator=generator),
                  "attention_mask": torch.ones(args.batch, length, dtype=torch.long)}
        for provider in args.providers:
            model = build(provider, layers, shape)
            for mode in args.modes:
                torch._dynamo.reset()
                # transformers' DeBERTa is compiled as is (graph breaks allowed); ours must need none (fullgraph).
                compiled = torch.compile(model, fullgraph=provider != "transformers")
                start = time.perf_counter()
                step(compiled, inputs, mode)
                compile_s = time.perf_counter() - start
                eager_out, compiled_out = step(model, inputs, "fwd"), step(compiled, inputs, "fwd")
                error = (eager_out - compiled_out).abs().max().item()
                times = {"eager": [], "compiled": []}
                for _ in range(args.warmup):
                    step(model, inputs, mode)
                    step(compiled, inputs, mode)
                for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
                    for name, fn in (("eager", model), ("compiled", compiled)):
                        start = time.perf_counter()
                        step(fn, inputs, mode)
                        times[name].append(time.perf_counter() - start)
                eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
                row = dict(case="model", mode=mode, batch=args.batch, length=length, layers=layers,
                           provider=provider, eager_s=eager_s, compiled_s=compiled_s,
                           speedup=eager_s / compiled_s, compile_s=compile_s, max_abs_error=error,
                           threads=torch.get_num_threads(), load=_load(), **facts)
                rows.append(row)
                print(harness.format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


COLUMNS = ("mode", "length", "layers", "provider", "eager_s", "compiled_s", "speedup", "compile_s", "max_abs_error",
           "load")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        length, _, layers = item.partition(":")
        shapes.append((int(length), int(layers or 2)))
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated LENGTH:LAYERS (default 128:2,512:2; --quick 64:1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (comma-separated)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"any of {', '.join(PROVIDERS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small model, one short shape, 3 repeats")
    parser.add_argument("--output", default=None, help="CSV path (default bench/results/compile_cpu.csv)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for mode in args.modes:
        if mode not in ("fwd", "fwd+bwd"):
            parser.error(f"--modes: unknown mode {mode!r} (fwd, fwd+bwd)")
    for provider in args.providers:
        if provider not in PROVIDERS:
            parser.error(f"--providers: unknown provider {provider!r} ({', '.join(PROVIDERS)})")
    if args.shapes is None:
        args.shapes = [(64, 1)] if args.quick else [(128, 2), (512, 2)]
    if args.quick:
        args.repeats = min(args.repeats, 3)
    facts = harness.machine_facts()
    print(f"machine: {facts['machine']} ({facts['device']}); torch {facts['torch']}, transformers "
          f"{facts['transformers']}; load average {_load()}")
    print(harness.format_table([], COLUMNS))
    rows = run(args)
    output = args.output or os.path.join(harness.results_dir(), "compile_cpu.csv")
    harness.write_csv(rows, output)
    print(f"\n{harness.format_table(rows, COLUMNS)}\n\nwrote {output}")


if __name__ == "__main__":
    sys.exit(main())
