"""GPU check of the adapter kernels: correctness at DeBERTa widths, then fused vs eager timings, in one script.

    python bench/gpu_adapters.py              # on a CUDA machine (about 6 minutes, mostly first compiles
                                              # and autotuning; --widths 768 halves the timing part)
    python bench/gpu_adapters.py --dry-run    # tiny shapes on the CPU under TRITON_INTERPRET=1 (script check)

1. Correctness, bf16 / fp16 / fp32 at widths 768 and 1024 with 32k tokens: LoRA linear (with dropout), q/k/v
   LoRA, bottleneck adapter, IA³; output and every gradient within the error budget |kernel - fp64| <=
   2 |torch same dtype - fp64| + floor. fp32 uses exact (ieee) dots and torch's highest matmul precision.
2. Median times in bf16 (triton.testing.do_bench with p20/p80, and do_bench_cudagraph: the same calls
   replayed from a CUDA graph, i.e. without Python/launch overhead), forward and forward+backward, of: the base
   linear; eager LoRA as PEFT/AdapterHub compute it (base, x Aᵀ, · Bᵀ, · s, add); our fused LoRA; our merged
   LoRA (forward); q/k/v with LoRA on q and v, three eager LoRA linears vs one fused launch; bottleneck adapters
   (seq_bn: relu, m = H/16; par_bn: relu, m = H/2, s = 4), eager vs fused.
3. A table with the targets (fused LoRA fwd <= 1.15x base; fused LoRA fwd+bwd >= 2x faster than eager; fused
   bottleneck >= 1.7x faster than eager) and a CSV in bench/results/ naming the GPU, versions and git sha.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deberta_fast.ops.bottleneck import bottleneck_adapter, bottleneck_adapter_reference  # noqa: E402
from deberta_fast.ops.ia3 import ia3_linear, ia3_linear_reference  # noqa: E402
from deberta_fast.ops.lora import lora_linear, lora_linear_reference  # noqa: E402
from deberta_fast.ops.lora_merge import merge_lora  # noqa: E402
from deberta_fast.ops.lora_qkv import lora_qkv, lora_qkv_reference  # noqa: E402

from deberta_fast.benchmark import harness  # noqa: E402

FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}



# ------------------------------------------------------------------------------------------------ facts


def machine_facts(device) -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
        "git": harness.git_revision(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ----------------------------------------------------------------------------------------------- timing


def timed(fn, device, grad_to_none=None):
    """(median, p20, p80) in milliseconds of back-to-back calls launched from Python."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    return _cpu_times(fn, grad_to_none)


def timed_graph(fn, device, grad_to_none=None):
    """Median ms per call replaying a CUDA graph of many calls: the GPU time without host overhead (None when
    capture fails; on the CPU the plain timer)."""
    if device.type != "cuda":
        return _cpu_times(fn, grad_to_none)[0]
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, grad_to_none=grad_to_none, return_mode="median")
    except Exception as error:  # a capture failure must not lose the run's other numbers
        print(f"# CUDA graph timing failed: {type(error).__name__}: {str(error)[:200]}")
        return None


def _cpu_times(fn, grad_to_none):
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def fwd_bwd(fn, grad):
    def run():
        fn().backward(grad)
    return run


def fwd_bwd_many(fn, grads):
    def run():
        torch.autograd.backward(fn(), grads)
    return run


# ------------------------------------------------------------------------------------------- correctness


def leaf(t, dtype, grad):
    return t.detach().to(dtype).requires_grad_(grad)


def check(case, fn_ours, fn_ref, inputs, dtype, rows, width):
    """Budget check of the outputs and gradients of fn_ours vs fn_ref(fp64), fn_ref(same dtype)."""
    grad_flags = [isinstance(t, torch.Tensor) and t.requires_grad for t in inputs]

    def prepared(dt):
        return [leaf(t, dtype, g).to(dt).detach().requires_grad_(g) if isinstance(t, torch.Tensor) else t
                for t, g in zip(inputs, grad_flags)]

    results = []
    runs = {}
    for label, fn, dt in (("ours", fn_ours, dtype), ("torch", fn_ref, dtype), ("oracle", fn_ref, torch.float64)):
        args = prepared(dt)
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator(device=outs[0].device).manual_seed(7)
        grads_out = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
                     for o in outs]
        wanted = [a for a, g in zip(args, grad_flags) if g]
        grads = torch.autograd.grad(outs, wanted, grads_out)
        runs[label] = [o.detach() for o in outs] + [g.detach() for g in grads]
        del args, out, outs, grads
    names = [f"out{i}" for i in range(len(runs["ours"]) - sum(grad_flags))]
    names += [f"grad{i}" for i, g in enumerate(grad_flags) if g]
    for name, ours, same, oracle in zip(names, runs["ours"], runs["torch"], runs["oracle"]):
        scale = max(oracle.abs().max().item(), 1e-30)
        err = (ours.double() - oracle).abs().max().item()
        err_torch = (same.double() - oracle).abs().max().item()
        budget = 2 * err_torch + FLOOR[dtype] * scale
        finite = bool(torch.isfinite(ours).all())
        results.append(dict(kind="correctness", case=case, dtype=str(dtype).replace("torch.", ""), width=width,
                            tokens=rows, tensor=name, error=err, torch_error=err_torch, budget=budget,
                            ok=finite and err <= budget))
    return results


def correctness(width, tokens, dtype, device, rank):
    batch = max(tokens // 512, 1)
    seq = tokens // batch
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g, device=device) * scale).requires_grad_(grad)

    x = rnd(batch, seq, width, grad=True)
    w, b = rnd(width, width, scale=width ** -0.5), rnd(width)
    a, bb = rnd(rank, width, scale=width ** -0.5, grad=True), rnd(width, rank, scale=rank ** -0.5, grad=True)
    rows = []
    rows += check("lora_linear p=0.1", lambda *t: lora_linear(*t, 2.0, 0.1, seed=3, backend="triton"),
                  lambda *t: lora_linear_reference(*t, 2.0, 0.1, seed=3), [x, w, b, a, bb], dtype, tokens, width)
    wk, bk = rnd(width, width, scale=width ** -0.5), rnd(width)
    wv, bv = rnd(width, width, scale=width ** -0.5), rnd(width)
    a2, b2 = rnd(rank, width, scale=width ** -0.5, grad=True), rnd(width, rank, scale=rank ** -0.5, grad=True)

    def qkv(fn, **kw):
        return lambda x, w, b, wk, bk, wv, bv, a, bb, a2, b2: fn(x, w, b, wk, bk, wv, bv, (a, bb, 2.0), None,
                                                                  (a2, b2, 1.0), dropout_p=0.0, **kw)

    rows += check("lora_qkv q,v", qkv(lora_qkv, backend="triton"), qkv(lora_qkv_reference),
                  [x, w, b, wk, bk, wv, bv, a, bb, a2, b2], dtype, tokens, width)
    m = width // 16
    bn = [rnd(m, width, scale=width ** -0.5, grad=True), rnd(m, grad=True), rnd(width, m, scale=m ** -0.5, grad=True),
          rnd(width, grad=True), rnd(batch, seq, width, grad=True), (1 + 0.3 * rnd(width)).requires_grad_()]
    rows += check("bottleneck gelu channel-scaled",
                  lambda x, *t: bottleneck_adapter(x, *t[:5], activation="gelu", scaling=t[5], backend="triton"),
                  lambda x, *t: bottleneck_adapter_reference(x, *t[:5], "gelu", t[5]), [x, *bn], dtype, tokens, width)
    l = (1 + 0.3 * rnd(width)).requires_grad_()
    rows += check("ia3_linear", lambda *t: ia3_linear(*t, backend="triton"), ia3_linear_reference, [x, w, b, l],
                  dtype, tokens, width)
    return rows


# ----------------------------------------------------------------------------------------------- timing


def timings(width, tokens, device, rank, with_dropout):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = max(tokens // 512, 1)
    seq = tokens // batch

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)

    x = rnd(batch, seq, width, grad=True)
    w, b = rnd(width, width, scale=width ** -0.5), rnd(width)
    a, bb = rnd(rank, width, scale=width ** -0.5, grad=True), rnd(width, rank, scale=rank ** -0.5, grad=True)
    gy = rnd(batch, seq, width)
    s = 2.0
    merged = merge_lora(w, a.detach(), bb.detach(), s)
    lora_params = [x, a, bb]
    rows = []

    def add(case, provider, mode, fn, grads=None):
        p50, p20, p80 = timed(fn, device, grads)
        graph = timed_graph(fn, device, grads)
        rows.append(dict(kind="timing", case=case, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                         width=width, tokens=tokens, rank=rank, median_ms=p50, p20_ms=p20, p80_ms=p80,
                         graph_ms=graph if graph is not None else ""))

    lin = lambda: F.linear(x, w, b)  # noqa: E731
    add("lora", "base linear", "fwd", lin)
    add("lora", "base linear", "fwd+bwd", fwd_bwd(lin, gy), [x])
    for p in (0.0, 0.1) if with_dropout else (0.0,):
        case = f"lora p={p}"
        eager = lambda p=p: lora_linear_reference(x, w, b, a, bb, s, p)  # noqa: E731
        fused = lambda p=p: lora_linear(x, w, b, a, bb, s, p, seed=1, backend="triton")  # noqa: E731
        add(case, "eager (PEFT/AdapterHub)", "fwd", eager)
        add(case, "eager (PEFT/AdapterHub)", "fwd+bwd", fwd_bwd(eager, gy), lora_params)
        add(case, "fused", "fwd", fused)
        add(case, "fused", "fwd+bwd", fwd_bwd(fused, gy), lora_params)
    add("lora p=0.0", "merged", "fwd", lambda: F.linear(x, merged, b))

    wk, bk = rnd(width, width, scale=width ** -0.5), rnd(width)
    wv, bv = rnd(width, width, scale=width ** -0.5), rnd(width)
    a2, b2 = rnd(rank, width, scale=width ** -0.5, grad=True), rnd(width, rank, scale=rank ** -0.5, grad=True)
    qkv_args = (x, w, b, wk, bk, wv, bv, (a, bb, s), None, (a2, b2, s))
    eager_qkv = lambda: lora_qkv_reference(*qkv_args)  # noqa: E731
    fused_qkv = lambda: lora_qkv(*qkv_args, backend="triton")  # noqa: E731
    qkv_grads = [x, a, bb, a2, b2]
    add("qkv (LoRA on q, v)", "eager (3 LoRA linears)", "fwd", eager_qkv)
    add("qkv (LoRA on q, v)", "eager (3 LoRA linears)", "fwd+bwd", fwd_bwd_many(eager_qkv, [gy] * 3), qkv_grads)
    add("qkv (LoRA on q, v)", "fused (one launch)", "fwd", fused_qkv)
    add("qkv (LoRA on q, v)", "fused (one launch)", "fwd+bwd", fwd_bwd_many(fused_qkv, [gy] * 3), qkv_grads)

    residual = rnd(batch, seq, width, grad=True)
    placements = (("bottleneck seq_bn (m=H/16)", width // 16, 1.0), ("bottleneck par_bn (m=H/2)", width // 2, 4.0))
    for name, m, scaling in placements:
        params = [rnd(m, width, scale=width ** -0.5, grad=True), rnd(m, grad=True),
                  rnd(width, m, scale=m ** -0.5, grad=True), rnd(width, grad=True)]
        def eager_bn(p=params, sc=scaling):
            return bottleneck_adapter_reference(x, *p, residual, "relu", sc)

        def fused_bn(p=params, sc=scaling):
            return bottleneck_adapter(x, *p, residual, activation="relu", scaling=sc, backend="triton")

        grads = [x, residual, *params]
        add(name, "eager", "fwd", eager_bn)
        add(name, "eager", "fwd+bwd", fwd_bwd(eager_bn, gy), grads)
        add(name, "fused", "fwd", fused_bn)
        add(name, "fused", "fwd+bwd", fwd_bwd(fused_bn, gy), grads)
    return rows


def summarize(rows):
    """Target ratios from the timing rows of one width, from Python-launched calls and from CUDA graph replay."""
    launched = {(r["case"], r["provider"], r["mode"]): r["median_ms"] for r in rows}
    graphed = {(r["case"], r["provider"], r["mode"]): r["graph_ms"] for r in rows if r["graph_ms"] != ""}
    width = rows[0]["width"]
    out = []

    def ratio(label, num, den, target, higher_is_better):
        entry = dict(kind="target", case=label, width=width, target=f"{'>=' if higher_is_better else '<='} {target}")
        for name, t in (("launched", launched), ("graph", graphed)):
            if num in t and den in t:
                value = t[num] / t[den]
                entry[f"ratio_{name}"] = value
                entry[f"met_{name}"] = value >= target if higher_is_better else value <= target
        if len(entry) > 4:
            out.append(entry)

    ratio("fused LoRA fwd / base fwd", ("lora p=0.0", "fused", "fwd"), ("lora", "base linear", "fwd"), 1.15, False)
    ratio("merged LoRA fwd / base fwd", ("lora p=0.0", "merged", "fwd"), ("lora", "base linear", "fwd"), 1.05, False)
    ratio("eager / fused LoRA fwd+bwd (p=0)", ("lora p=0.0", "eager (PEFT/AdapterHub)", "fwd+bwd"),
          ("lora p=0.0", "fused", "fwd+bwd"), 2.0, True)
    ratio("eager / fused LoRA fwd+bwd (p=0.1)", ("lora p=0.1", "eager (PEFT/AdapterHub)", "fwd+bwd"),
          ("lora p=0.1", "fused", "fwd+bwd"), 2.0, True)
    ratio("fused LoRA fwd+bwd / base fwd+bwd", ("lora p=0.0", "fused", "fwd+bwd"), ("lora", "base linear", "fwd+bwd"),
          1.15, False)
    ratio("eager / fused qkv fwd+bwd", ("qkv (LoRA on q, v)", "eager (3 LoRA linears)", "fwd+bwd"),
          ("qkv (LoRA on q, v)", "fused (one launch)", "fwd+bwd"), 2.0, True)
    for name in ("bottleneck seq_bn (m=H/16)", "bottleneck par_bn (m=H/2)"):
        for mode in ("fwd", "fwd+bwd"):
            ratio(f"eager / fused {name} {mode}", (name, "eager", mode), (name, "fused", mode), 1.7, True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (default 32768; dry run 64)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="hidden sizes (default 768 1024)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/gpu_adapters_<gpu>.csv)")
    args = parser.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        tokens, widths = args.tokens or 64, args.widths or [48, 80]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run to check the script on the CPU")
        device = torch.device("cuda")
        tokens, widths = args.tokens or 32768, args.widths or [768, 1024]
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    facts = machine_facts(device)
    started = time.perf_counter()
    print(f"# adapter kernels on {facts['gpu']} (torch {facts['torch']}, triton {facts['triton']}, git {facts['git']})")

    rows = []
    if not args.skip_correctness:
        for name in ("bf16", "fp16", "fp32"):
            if device.type == "cpu" and name == "bf16":
                continue  # the interpreter cannot do bf16 arithmetic; bf16 runs on the GPU
            # fp16/fp32: the first config of each kernel (tuning is for the bf16 timings, which tune on the
            # same shapes in the bf16 correctness pass first).
            os.environ["DEBERTA_FAST_AUTOTUNE"] = "1" if name == "bf16" else "0"
            for width in widths:
                rows += correctness(width, tokens, DTYPES[name], device, args.rank)
                torch.cuda.empty_cache() if device.type == "cuda" else None
            print(f"# correctness {name} done at {time.perf_counter() - started:.0f}s", flush=True)
        os.environ["DEBERTA_FAST_AUTOTUNE"] = "1"
        bad = [r for r in rows if not r["ok"]]
        print(harness.format_table(rows, ["case", "dtype", "width", "tensor", "error", "torch_error", "budget", "ok"]))
        print(f"# correctness: {len(rows) - len(bad)}/{len(rows)} tensors within the error budget")

    targets = []
    for width in widths:
        timing_rows = timings(width, tokens, device, args.rank, with_dropout=True)
        rows += timing_rows
        targets += summarize(timing_rows)
        print(f"# timings at width {width} done at {time.perf_counter() - started:.0f}s", flush=True)
    if args.dry_run:
        print("# dry run: interpreter timings say nothing about GPU performance; this only checks the script")
    print(harness.format_table([r for r in rows if r["kind"] == "timing"],
                ["case", "provider", "mode", "dtype", "width", "tokens", "median_ms", "p20_ms", "p80_ms", "graph_ms"]))
    print("# ratios: 'launched' = back-to-back calls from Python (host overhead included); 'graph' = CUDA graph")
    print("# replay of the same calls (GPU time only)")
    print(harness.format_table(targets, ["case", "width", "target", "ratio_launched", "met_launched", "ratio_graph", "met_graph"]))
    rows += targets
    for r in rows:
        r.update(facts)
    if args.out:
        path = args.out
    elif args.dry_run:
        path = os.path.join(tempfile.gettempdir(), "gpu_adapters_dry_run.csv")
    else:
        slug = "".join(c if c.isalnum() else "_" for c in facts["gpu"]).strip("_").lower()
        path = os.path.join(harness.results_dir(), f"gpu_adapters_{slug}.csv")
    harness.write_csv(rows, path)
    print(f"# wrote {path} in {time.perf_counter() - started:.0f}s")
    failed = [r for r in rows if r["kind"] == "correctness" and not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
