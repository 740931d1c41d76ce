"""GPU check of deberta_fast's Triton disentangled attention: correctness, speed and peak memory in one run.

    python bench/gpu_attention.py                 # on a CUDA machine (about 5-8 minutes on one H100/H200)
    python bench/gpu_attention.py --dry-run       # tiny shapes on CPU under the Triton interpreter (plumbing only)
    python -m deberta_fast.benchmark.gpu_attention ...   # the same from an installed package

Sections (all in one process, one device, so ratios are comparable):
1. slots   - the kernels' on-device bucket formula equals transformers' (torch on the same device), every distance
             of L = 8192 (the |d| = max_position - 1 knee included).
2. correct - output and dq, dk, dv, dPk, dPq in bf16 / fp16 / fp32 (true fp32) at L in {512, 2048, 8192} against a
             float64 oracle, with the error budget err <= 2 x err(PyTorch same dtype) + floor; dropout keep rate;
             backward bitwise determinism.
3. timing  - forward, backward, forward+backward medians (triton.testing.do_bench) at L in {512, 2048, 8192},
             B·L = 16,384 tokens, H = 12, D = 64, 256 buckets, bf16, no padding, no dropout:
               op level    (q, k, v, Pk, Pq given):  ours | SDPA pinned to FLASH_ATTENTION (no positions) |
                                                     flashdeberta 0.0.8 op
               layer level (hidden states -> context, projections included, as the peers publish):
                                                     ours | transformers eager | disentangled-flash 1.1.1 |
                                                     flashdeberta 0.0.8
             and the peak memory of each forward+backward above what was allocated before it.
4. targets - the issue's goals, each reported as met or missed with the measured ratio.

Results: a printed table and a CSV (one row per number, with GPU name, torch / triton / transformers / peer
versions and the git sha) under bench/results/. The peers are optional: install their wheels first
(``pip install --no-deps disentangled-flash==1.1.1 flashdeberta==0.0.8``, or put an unpacked copy on
``--peers-path``); a missing peer is a row with status "unavailable".
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata
import math
import os
import statistics
import sys
import time
from pathlib import Path

from deberta_fast.benchmark import harness  # noqa: E402

TOKENS = 16_384
LENGTHS = (512, 2048, 8192)
FLOOR = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks the script, not the kernels' speed")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 512 2048 8192)")
    parser.add_argument("--tokens", type=int, default=None, help="B·L per timing shape (default 16384)")
    parser.add_argument("--heads", type=int, default=None, help="heads in the timing shapes (default 12)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["slots", "correct", "timing"],
                        help="sections to skip")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default bench/results/gpu_attention_<gpu>.csv)")
    parser.add_argument("--peers-path", type=Path, default=None,
                        help="folder holding unpacked disentangled_flash / flashdeberta packages")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.lengths = args.lengths or [24, 40]
        args.tokens = args.tokens or 80
        args.heads = args.heads or 2
    else:
        args.lengths = args.lengths or list(LENGTHS)
        args.tokens = args.tokens or TOKENS
        args.heads = args.heads or 12
    return args


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(device):
    import torch

    return dict(
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
        torch=torch.__version__, triton=_version("triton"), transformers=_version("transformers"),
        disentangled_flash=_version("disentangled-flash"), flashdeberta=_version("flashdeberta"),
        git_sha=harness.git_revision(), timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


class Results:
    """Rows of (section, name, level, mode, dtype, length, batch, value, unit, status, note) + environment."""

    FIELDS = ["section", "provider", "level", "mode", "dtype", "length", "batch", "heads", "head_dim", "metric",
              "value", "unit", "status", "note"]

    def __init__(self, env):
        self.env = env
        self.rows = []

    def add(self, **row):
        row = {k: row.get(k, "") for k in self.FIELDS}
        self.rows.append(row)
        return row

    def write(self, path: Path):
        """Atomic (harness.write_csv): a half-written CSV never replaces a good one."""
        harness.write_csv([{**row, **self.env} for row in self.rows], str(path))


# ----------------------------------------------------------------------------------------------------------------
# shapes and providers
# ----------------------------------------------------------------------------------------------------------------


def v3_spec(buckets=256, max_rel=512):
    from deberta_fast.ops.positions import RelativePositionSpec

    return RelativePositionSpec(c2p=True, p2c=True, position_buckets=buckets, max_relative_positions=max_rel)


def hf_config(heads, head_dim, buckets, max_rel):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        hidden_size=heads * head_dim, num_attention_heads=heads, intermediate_size=4 * heads * head_dim,
        relative_attention=True, pos_att_type="p2c|c2p", position_buckets=buckets, max_relative_positions=max_rel,
        share_att_key=True, max_position_embeddings=max_rel, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0, norm_rel_ebd="layer_norm", position_biased_input=False,
    )


def peer_modules(peers_path):
    """{'disentangled_flash': module or reason, 'flashdeberta': module or reason}."""
    if peers_path is not None:
        sys.path.insert(0, str(peers_path))
    found = {}
    for name, sub in (("disentangled_flash", "disentangled_flash.training"),
                      ("flashdeberta", "flashdeberta.model")):
        try:
            found[name] = __import__(sub, fromlist=["_"])
        except Exception as error:  # noqa: BLE001 - any import failure makes the peer unavailable
            found[name] = f"unavailable: {type(error).__name__}: {error}"
    return found


def make_op_inputs(batch, heads, length, head_dim, spec, dtype, device, seed=0, requires_grad=True):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    # q, k, v as the module produces them: [B, L, H, D] viewed as [B, H, L, D]
    q, k, v = (randn(batch, length, heads, head_dim).transpose(1, 2) for _ in range(3))
    pk, pq = (randn(1, heads, spec.num_slots, head_dim, scale=0.5) for _ in range(2))
    tensors = [t.detach().requires_grad_(requires_grad) for t in (q, k, v, pk, pq)]
    grad = randn(batch, heads, length, head_dim)
    return tensors, grad


# ----------------------------------------------------------------------------------------------------------------
# 1. slots
# ----------------------------------------------------------------------------------------------------------------


def check_slots(results, device, dry):
    from deberta_fast.ops.attention_triton import kernel_distance_slots
    from deberta_fast.ops.positions import RelativePositionSpec, distance_slot_table

    specs = [v3_spec(), RelativePositionSpec(True, True, 128, 1024), RelativePositionSpec(True, True, 24, 100),
             RelativePositionSpec(True, True, -1, 512)]
    length = 64 if dry else 8192
    for spec in specs:
        got = kernel_distance_slots(length, spec, device).long()
        ref = distance_slot_table(length, spec, device)
        mismatches = int((got != ref).sum())
        results.add(section="slots", provider="ours", metric="slot mismatches", length=length, value=mismatches,
                    status="ok" if mismatches == 0 else "FAIL",
                    note=f"buckets={spec.position_buckets} max_rel={spec.max_relative_positions}")


# ----------------------------------------------------------------------------------------------------------------
# 2. correctness
# ----------------------------------------------------------------------------------------------------------------


def check_correctness(results, device, dry):
    import torch

    from deberta_fast.ops.attention_reference import disentangled_attention_reference
    from deberta_fast.ops.attention_triton import disentangled_attention_triton, dropout_keep_mask
    from deberta_fast.ops.positions import softmax_scale

    spec = v3_spec() if not dry else v3_spec(8, 24)
    head_dim = 64 if not dry else 16
    scale = softmax_scale(head_dim, 3)
    names = ("out", "dq", "dk", "dv", "dpk", "dpq")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if not dry else [torch.float16, torch.float32]
    torch.backends.cuda.matmul.allow_tf32 = False
    for length in results.lengths:
        batch, heads = (2, 2) if length <= 2048 else (1, 2)
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
        mask[-1, : length // 8] = 0  # left padding in the last sequence
        for dtype in dtypes:
            tensors, grad = make_op_inputs(batch, heads, length, head_dim, spec, dtype, device, seed=length)

            def grads(fn, cast):
                leaves = [t.detach().to(cast).requires_grad_() for t in tensors]
                out = fn(leaves)
                out.backward(grad.to(cast))
                return [out.detach()] + [leaf.grad for leaf in leaves]

            def ours(leaves):
                return disentangled_attention_triton(*leaves, mask, spec=spec, softmax_scale=scale, allow_tf32=False)

            def reference(leaves):
                return disentangled_attention_reference(*leaves, mask, spec, scale)[0]

            try:
                got = grads(ours, dtype)
                oracle = grads(reference, torch.float64)
                same = grads(reference, dtype)
            except torch.cuda.OutOfMemoryError as error:
                results.add(section="correct", provider="ours", dtype=str(dtype)[6:], length=length, status="oom",
                            note=str(error)[:200])
                continue
            for name, g, s, o in zip(names, got, same, oracle):
                o = o.double()
                err = (g.double() - o).abs().max().item()
                base = (s.double() - o).abs().max().item()
                budget = 2 * base + FLOOR[str(dtype)[6:]] * max(1.0, o.abs().max().item())
                results.add(section="correct", provider="ours", level="op", mode=name, dtype=str(dtype)[6:],
                            length=length, batch=batch, heads=heads, head_dim=head_dim, metric="max abs error",
                            value=f"{err:.3e}", unit="", status="ok" if err <= budget else "FAIL",
                            note=f"budget {budget:.3e} (torch {str(dtype)[6:]} error {base:.3e})")
            del got, oracle, same
            torch.cuda.empty_cache() if device.type == "cuda" else None

    # dropout keep rate and backward determinism (bf16 on GPU)
    p = 0.1
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep = dropout_keep_mask(seed, 2, 4, 256, 256, p)
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    results.add(section="correct", provider="ours", mode="dropout", metric="keep rate", value=f"{rate:.5f}",
                status="ok" if abs(rate - (1 - p)) < 5 * sigma else "FAIL", note=f"expected {1 - p} +- {5 * sigma:.5f}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = 2048 if not dry else 40
    tensors, grad = make_op_inputs(2, 4, length, head_dim, spec, dtype, device, seed=7)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = disentangled_attention_triton(*leaves, None, spec=spec, softmax_scale=scale, dropout_p=p, seed=seed)
        out.backward(grad)
        runs.append([out] + [leaf.grad for leaf in leaves])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    results.add(section="correct", provider="ours", mode="dropout fwd+bwd", dtype=str(dtype)[6:], length=length,
                metric="bitwise equal across two runs", value=int(same), status="ok" if same else "FAIL")


# ----------------------------------------------------------------------------------------------------------------
# 3. timing and memory
# ----------------------------------------------------------------------------------------------------------------


def bench_ms(fn, device, rep_ms, grad_to_none=None):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device):
    """Peak allocated memory of one fn() call above what was allocated before it (MiB); NaN on CPU."""
    import torch

    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_provider(results, provider, level, length, batch, heads, head_dim, dtype, device, rep_ms, forward, leaves,
                  grad, extra_grad_tensors=()):
    """Time forward (no grad), backward only, forward+backward of ``forward(*leaves)``; record peak memory."""
    import torch

    common = dict(section="timing", provider=provider, level=level, dtype=str(dtype)[6:], length=length,
                  batch=batch, heads=heads, head_dim=head_dim, unit="ms")
    to_none = list(leaves) + list(extra_grad_tensors)
    try:
        with torch.no_grad():
            fwd = bench_ms(lambda: forward(*leaves), device, rep_ms)
        out = forward(*leaves)
        bwd = bench_ms(lambda: out.backward(grad, retain_graph=True), device, rep_ms, grad_to_none=to_none)
        out = None  # free the graph before the next measurement

        def step():
            forward(*leaves).backward(grad)

        both = bench_ms(step, device, rep_ms, grad_to_none=to_none)
        for t in to_none:
            t.grad = None
        peak = peak_mib(step, device)
        for t in to_none:
            t.grad = None
    except torch.cuda.OutOfMemoryError as error:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            results.add(**common, mode=mode, metric="median time", status="oom", note=str(error)[:160])
        torch.cuda.empty_cache()
        return
    results.add(**common, mode="fwd", metric="median time", value=f"{fwd:.4f}", status="ok")
    results.add(**common, mode="bwd", metric="median time", value=f"{bwd:.4f}", status="ok")
    results.add(**common, mode="fwd+bwd", metric="median time", value=f"{both:.4f}", status="ok")
    common["unit"] = "MiB"
    results.add(**common, mode="fwd+bwd", metric="peak memory", value=f"{peak:.1f}", status="ok")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_timing(results, device, dry, peers, rep_ms):
    import torch
    import torch.nn.functional as F
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    from deberta_fast.models.attention import fast_attention_from
    from deberta_fast.ops.attention_triton import disentangled_attention_triton
    from deberta_fast.ops.positions import softmax_scale

    heads = results.heads
    head_dim = 64 if not dry else 16
    buckets, max_rel = (256, 512) if not dry else (8, 24)
    spec = v3_spec(buckets, max_rel)
    dtype = torch.bfloat16 if not dry else torch.float32
    scale = softmax_scale(head_dim, 3)
    for length in results.lengths:
        batch = max(1, results.tokens // length)
        shape = dict(length=length, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                     rep_ms=rep_ms)

        # ---- op level ----
        leaves, grad = make_op_inputs(batch, heads, length, head_dim, spec, dtype, device)
        time_provider(results, "ours", "op", forward=lambda q, k, v, pk, pq: disentangled_attention_triton(
            q, k, v, pk, pq, None, spec=spec, softmax_scale=scale), leaves=leaves, grad=grad, **shape)

        def sdpa(q, k, v):
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        time_provider(results, "sdpa_flash" if device.type == "cuda" else "sdpa_cpu", "op", forward=sdpa,
                      leaves=leaves[:3], grad=grad, **shape)
        fd = peers["flashdeberta"]
        if device.type == "cuda" and not isinstance(fd, str):
            try:
                from flashdeberta.ops.flash_attention import flash_attention_with_disentangled

                time_provider(results, "flashdeberta", "op",
                              forward=lambda q, k, v, pk, pq: flash_attention_with_disentangled(
                                  q.contiguous(), k.contiguous(), v.contiguous(), None, pk, pq, False, scale,
                                  buckets, max_rel),
                              leaves=leaves, grad=grad, **shape)
            except Exception as error:  # noqa: BLE001
                results.add(section="timing", provider="flashdeberta", level="op", length=length, status="error",
                            note=f"{type(error).__name__}: {error}"[:300])
        else:
            results.add(section="timing", provider="flashdeberta", level="op", length=length,
                        status="unavailable", note=fd if isinstance(fd, str) else "CUDA only")
        leaves = grad = None

        # ---- layer level: hidden states -> context, same weights everywhere ----
        config = hf_config(heads, head_dim, buckets, max_rel)
        torch.manual_seed(0)
        reference = hf.DisentangledSelfAttention(config).to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(1)
        hidden = torch.randn(batch, length, config.hidden_size, generator=gen, device=device).to(dtype)
        hidden.requires_grad_()
        rel = torch.randn(2 * buckets, config.hidden_size, generator=gen, device=device).to(dtype).requires_grad_()
        grad = torch.randn(batch, length, config.hidden_size, generator=gen, device=device).to(dtype)
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        layer_shape = dict(shape)

        ours_layer = fast_attention_from(copy.deepcopy(reference))
        ours_layer.backend = "triton"
        time_provider(results, "ours", "layer", forward=lambda x, r: ours_layer(x, token_mask, rel_embeddings=r)[0],
                      leaves=[hidden, rel], grad=grad, extra_grad_tensors=list(ours_layer.parameters()), **layer_shape)

        # transformers builds the pair mask and relative positions once per encoder forward: outside the timing.
        pair_mask = token_mask[:, None, None, :] & token_mask[:, None, :, None]
        relative_pos = hf.build_relative_position(hidden, hidden, bucket_size=buckets, max_position=max_rel)
        time_provider(results, "transformers_eager", "layer",
                      forward=lambda x, r: reference(x, pair_mask, relative_pos=relative_pos, rel_embeddings=r)[0],
                      leaves=[hidden, rel], grad=grad, extra_grad_tensors=list(reference.parameters()), **layer_shape)
        pair_mask = relative_pos = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

        for name, peer, build in (
            ("disentangled_flash", peers["disentangled_flash"],
             lambda m: m.TritonTrainingDisentangledSelfAttention(config, assume_unpadded=True)),
            ("flashdeberta", peers["flashdeberta"], lambda m: m.FlashDisentangledSelfAttention(config)),
        ):
            if device.type != "cuda" or isinstance(peer, str):
                results.add(section="timing", provider=name, level="layer", length=length, status="unavailable",
                            note=peer if isinstance(peer, str) else "CUDA only")
                continue
            try:
                layer = build(peer).to(device, dtype)
                layer.load_state_dict(reference.state_dict(), strict=True)
                time_provider(results, name, "layer", forward=lambda x, r: layer(x, token_mask, rel_embeddings=r)[0],
                              leaves=[hidden, rel], grad=grad, extra_grad_tensors=list(layer.parameters()),
                              **layer_shape)
            except Exception as error:  # noqa: BLE001 - a peer that fails is a result, not the end of the run
                results.add(section="timing", provider=name, level="layer", length=length, status="error",
                            note=f"{type(error).__name__}: {error}"[:300])
            layer = None
        reference = ours_layer = hidden = rel = grad = None


# ----------------------------------------------------------------------------------------------------------------
# 4. targets, table
# ----------------------------------------------------------------------------------------------------------------


def _value(results, provider, level, mode, length, metric="median time"):
    for row in results.rows:
        if (row["section"], row["provider"], row["level"], row["mode"], row["length"], row["metric"]) == (
                "timing", provider, level, mode, length, metric) and row["status"] == "ok":
            return float(row["value"])
    return None


def evaluate_targets(results, lengths):
    long_l, short_l = max(lengths), min(lengths)
    sdpa = "sdpa_flash" if any(r["provider"] == "sdpa_flash" for r in results.rows) else "sdpa_cpu"
    checks = [
        (f"fwd+bwd L={long_l}: >= 1.5x faster than disentangled-flash (layer)", long_l, "disentangled_flash",
         "layer", "fwd+bwd", "median time", 1.5, "faster"),
        (f"fwd+bwd L={long_l}: >= 10x faster than transformers eager (layer)", long_l, "transformers_eager",
         "layer", "fwd+bwd", "median time", 10.0, "faster"),
        (f"fwd+bwd L={short_l}: >= 3x faster than transformers eager (layer)", short_l, "transformers_eager",
         "layer", "fwd+bwd", "median time", 3.0, "faster"),
        (f"fwd+bwd L={short_l}: within 2.5x of dense SDPA-FLASH (op)", short_l, sdpa, "op", "fwd+bwd",
         "median time", 2.5, "within"),
    ] + [
        (f"peak memory fwd+bwd L={n}: <= 1.3x dense SDPA-FLASH (op)", n, sdpa, "op", "fwd+bwd", "peak memory", 1.3,
         "within") for n in lengths
    ]
    for text, length, other, level, mode, metric, goal, kind in checks:
        ours = _value(results, "ours", level, mode, length, metric)
        theirs = _value(results, other, level, mode, length, metric)
        if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or ours <= 0 or theirs <= 0:
            results.add(section="target", provider="ours", level=level, mode=mode, length=length, metric=text,
                        status="not measured", note=f"{other} or ours missing")
            continue
        ratio = theirs / ours if kind == "faster" else ours / theirs
        met = ratio >= goal if kind == "faster" else ratio <= goal
        results.add(section="target", provider="ours", level=level, mode=mode, length=length, metric=text,
                    value=f"{ratio:.2f}", unit="x", status="met" if met else "MISSED",
                    note=f"ours {ours:.4g} vs {other} {theirs:.4g} ({metric})")


def print_table(results):
    cols = ["section", "provider", "level", "mode", "dtype", "length", "batch", "metric", "value", "unit", "status"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in results.rows)) for c in cols} if results.rows else {}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for row in results.rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols))
    print("environment: " + ", ".join(f"{k}={v}" for k, v in results.env.items()))


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_attention.py needs a CUDA device (use --dry-run to check the script on CPU)")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    peers = peer_modules(args.peers_path)
    results = Results(environment(device))
    results.lengths, results.tokens, results.heads = args.lengths, args.tokens, args.heads
    start = time.time()
    if "slots" not in args.skip:
        check_slots(results, device, args.dry_run)
    if "correct" not in args.skip:
        check_correctness(results, device, args.dry_run)
    if "timing" not in args.skip:
        run_timing(results, device, args.dry_run, peers, args.rep_ms)
        evaluate_targets(results, args.lengths)
    results.add(section="meta", metric="wall time", value=f"{time.time() - start:.1f}", unit="s", status="ok")
    gpu = results.env["gpu"].split(" (")[0].replace(" ", "_")
    results_dir = Path(harness.results_dir())
    out = args.out or ((results_dir.parent / "out" if args.dry_run else results_dir) / f"gpu_attention_{gpu}.csv")
    results.write(out)
    print_table(results)
    print(f"wrote {out}")
    failures = [r for r in results.rows if r["status"] == "FAIL"]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
