"""The one prepared GPU check: everything a first run on one H100 / H200 should do, in about 8 minutes, offline.

    python -m deberta_fast.benchmark.gpu_check              # on the CUDA machine (bench/gpu_check.sh does the same)
    python -m deberta_fast.benchmark.gpu_check --dry-run    # on any machine: imports, files, the plan; runs nothing

Steps (each a subprocess with its own time limit, so one that hangs or fails does not stop the others):
1. ``tests``     the whole pytest suite on CUDA (bf16 tests run, the triton backend on CUDA tensors, the model
                 classes end to end with ``auto`` in tests/test_gpu_end_to_end.py, torch.compile(fullgraph=True) of
                 every model class and the adapter model on the Triton kernels in tests/test_compile_export.py),
                 in 4 processes with pytest-xdist when installed; JUnit XML -> CSV rows.
                 tests/test_triton_compile.py is left to CI: it is CPU-only compile work, and here every kernel
                 compiles for the real device anyway.
2. ``attention`` deberta_fast.benchmark.gpu_attention at L = 512 and 8192 (correctness, timing, memory, targets).
3. ``adapters``  deberta_fast.benchmark.gpu_adapters at width 768 (LoRA, q/k/v LoRA, bottleneck, IA³).
4. ``sweep``     tile sweep of the attention forward and backward: BLOCK_M, BLOCK_N in {32, 64, 128}, num_warps in
                 {4, 8}, num_stages in {1, 2, 3} (forward) / 1 (backward: the positional-gradient partial's
                 read-modify-write must not be prefetched), per head dim (64, 128) and dtype (bf16, fp16), B·L = 16k
                 tokens at L = 2048, H = 12. A candidate counts only when its outputs match the default tiles'
                 outputs; the fastest that beats the default by more than 3% goes into
                 triton_kernels/tuned_tiles.json (which the launchers read), the rest stays on the defaults.

Every CSV goes to bench/results/ with the card's name in the file name and in its rows:
gpu_check_<card>.csv (steps, test outcomes), gpu_attention_<card>.csv, gpu_adapters_<card>.csv,
attention_tiles_<card>.csv (every sweep candidate's time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ("tests", "attention", "adapters", "sweep")
DEFAULT_LIMITS = {"tests": 160, "attention": 130, "adapters": 90, "sweep": 60}
SWEEP_BLOCKS = (32, 64, 128)
SWEEP_WARPS = (4, 8)
SWEEP_STAGES = {"forward": (1, 2, 3), "backward": (1,)}
SWEEP_HEAD_DIMS = (64, 128)
SWEEP_DTYPES = ("bfloat16", "float16")


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def _card_name(dry: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "dry-run (no GPU)" if dry else "no GPU"


def plan(card: str, limits: dict, steps, python: str) -> list[dict]:
    """The commands of each step (what --dry-run prints)."""
    slug = card_slug(card)
    results = REPO / "bench" / "results"
    junit = Path(tempfile.gettempdir()) / f"deberta_fast_gpu_check_{slug}.xml"
    commands = {
        # The compile-only layer is CPU work that CI runs; on the GPU machine the kernels compile for real.
        "tests": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  f"--ignore={REPO / 'tests' / 'test_triton_compile.py'}"] + _xdist() + [str(REPO / "tests")],
        "attention": [python, "-m", "deberta_fast.benchmark.gpu_attention", "--lengths", "512", "8192",
                      "--rep-ms", "40", "--out", str(results / f"gpu_attention_{slug}.csv")],
        "adapters": [python, "-m", "deberta_fast.benchmark.gpu_adapters", "--widths", "768",
                     "--out", str(results / f"gpu_adapters_{slug}.csv")],
        "sweep": [python, "-m", "deberta_fast.benchmark.gpu_check", "--sweep-only",
                  "--sweep-csv", str(results / f"attention_tiles_{slug}.csv"),
                  "--time-limit", str(max(10, limits["sweep"] - 15))],  # room to write the CSV and table
    }
    return [dict(step=s, command=commands[s], limit_s=limits[s], junit=str(junit) if s == "tests" else None)
            for s in steps]


def _xdist() -> list[str]:
    """Run the suite in 4 processes when pytest-xdist is installed (the device image has it)."""
    import importlib.util

    return ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []


def _files_needed() -> list[Path]:
    return [
        REPO / "tests" / "conftest.py",
        REPO / "tests" / "test_gpu_end_to_end.py",
        REPO / "deberta_fast" / "benchmark" / "gpu_attention.py",
        REPO / "deberta_fast" / "benchmark" / "gpu_adapters.py",
        REPO / "triton_kernels" / "tuned_tiles.json",
        REPO / "bench" / "results",
    ]


def _junit_rows(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        detail = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                detail = (child.get("message") or "")[:200]
        rows.append(dict(step="tests", item=f"{case.get('classname')}::{case.get('name')}", status=outcome,
                         seconds=case.get("time"), detail=detail))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# tile sweep
# ----------------------------------------------------------------------------------------------------------------


def _sweep_candidates(kind: str) -> list[dict]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            for bm in SWEEP_BLOCKS for bn in SWEEP_BLOCKS for w in SWEEP_WARPS for s in SWEEP_STAGES[kind]]


def _close(got, ref) -> bool:
    import torch

    for a, b in zip(got, ref):
        if a is None or b is None:
            continue
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            return False
        if (a - b).abs().max().item() > 2e-2 * b.abs().max().item() + 1e-3:
            return False
    return True


def run_sweep(csv_path: str, time_limit: float, table_path: str | None = None) -> list[dict]:
    """Time every candidate tile config (default first) until ``time_limit`` seconds are spent; write the CSV and
    the winners into the tuned-tile table. Returns the CSV rows."""
    import torch
    import triton.testing

    from deberta_fast.benchmark import harness
    from deberta_fast.triton_kernels import attention_tiles
    from deberta_fast.triton_kernels._common import block_d
    from deberta_fast.triton_kernels.disentangled_attention_bwd import disentangled_attention_backward
    from deberta_fast.triton_kernels.disentangled_attention_fwd import disentangled_attention_forward

    started = time.time()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    target = attention_tiles.current_target()
    length, heads, batch = 2048, 12, 8
    rows, winners = [], {}
    for dtype_name in SWEEP_DTYPES:
        dtype = getattr(torch, dtype_name)
        for hd in SWEEP_HEAD_DIMS:
            gen = torch.Generator(device=device).manual_seed(0)
            shape = (batch, length, heads, hd)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(3))
            table = torch.randn(1, 512, heads, hd, device=device, dtype=dtype, generator=gen).transpose(1, 2)
            grad = torch.randn_like(q)
            opts = dict(c2p=True, p2c=True, position_buckets=256, max_relative_positions=512,
                        softmax_scale=1.0 / (3 * hd) ** 0.5, dropout_p=0.0, num_prefix_keys=0)
            default_f = attention_tiles.default_tiles("forward", dtype, block_d(hd), False, target)
            default_b = attention_tiles.default_tiles("backward", dtype, block_d(hd), False, target)
            ref_out, ref_lse = disentangled_attention_forward(q, k, v, table, table, None, None, tiles=default_f,
                                                              **opts)
            ref_grads = disentangled_attention_backward(grad, q, k, v, table, table, None, None, ref_out, ref_lse,
                                                        tiles=default_b, **opts)
            for kind in ("forward", "backward"):
                default = default_f if kind == "forward" else default_b
                candidates = [default] + [c for c in _sweep_candidates(kind) if c != default]
                timings = {}
                for tiles in candidates:
                    if time.time() - started > time_limit:
                        rows.append(dict(kind=kind, dtype=dtype_name, head_dim=hd, **tiles, status="not run (time)"))
                        continue
                    try:
                        if kind == "forward":
                            def call(t=tiles):
                                return disentangled_attention_forward(q, k, v, table, table, None, None, tiles=t,
                                                                      **opts)
                            ok = _close(call(), (ref_out, ref_lse))
                        else:
                            def call(t=tiles):
                                return disentangled_attention_backward(grad, q, k, v, table, table, None, None,
                                                                       ref_out, ref_lse, tiles=t, **opts)
                            ok = _close(call(), ref_grads)
                        if not ok:
                            rows.append(dict(kind=kind, dtype=dtype_name, head_dim=hd, **tiles, status="mismatch"))
                            continue
                        ms = triton.testing.do_bench(call, warmup=5, rep=20)
                        timings[tuple(sorted(tiles.items()))] = ms
                        rows.append(dict(kind=kind, dtype=dtype_name, head_dim=hd, **tiles, ms=f"{ms:.4f}",
                                         status="ok"))
                    except Exception as error:  # out of resources, compile failure: recorded, not fatal
                        rows.append(dict(kind=kind, dtype=dtype_name, head_dim=hd, **tiles,
                                         status=f"error: {type(error).__name__}: {str(error)[:120]}"))
                if timings:
                    best = min(timings, key=timings.get)
                    base = timings.get(tuple(sorted(default.items())))
                    if base is not None and timings[best] < 0.97 * base:
                        key = attention_tiles.table_key(kind, target, dtype, block_d(hd))
                        winners[key] = dict(dict(best), ms=round(timings[best], 4), default_ms=round(base, 4),
                                            gpu=card)
    for row in rows:
        row.update(gpu=card, target=target, length=length, batch=batch, heads=heads)
    harness.write_csv(rows, csv_path)
    _write_table(winners, table_path or attention_tiles.TABLE_PATH)
    return rows


def _write_table(winners: dict, path: str) -> None:
    """Merge ``winners`` into the tuned-tile table, atomically."""
    data = {"note": "", "entries": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    data.setdefault("entries", {}).update(winners)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check imports and files, print the plan, run nothing")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--peers-path", default=None, help="passed to gpu_attention (unpacked peer wheels)")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                        help=f"time limit of a step (defaults {DEFAULT_LIMITS})")
    parser.add_argument("--sweep-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-csv", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_only:
        run_sweep(args.sweep_csv, args.time_limit)
        return 0

    limits = dict(DEFAULT_LIMITS)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in limits:
            parser.error(f"--limit: unknown step {name!r} (steps: {', '.join(STEPS)})")
        limits[name] = int(seconds)
    steps = [s for s in STEPS if s not in args.skip]
    card = _card_name(args.dry_run)
    slug = card_slug(card)
    commands = plan(card, limits, steps, sys.executable)
    if args.peers_path:
        for entry in commands:
            if entry["step"] == "attention":
                entry["command"] += ["--peers-path", args.peers_path]

    # Completeness: every module imports, every file is there.
    import importlib

    for module in ("deberta_fast.benchmark.gpu_attention", "deberta_fast.benchmark.gpu_adapters",
                   "deberta_fast.benchmark.harness", "deberta_fast.triton_kernels.attention_tiles"):
        importlib.import_module(module)
    missing = [str(p) for p in _files_needed() if not p.exists()]
    if missing:
        print("missing: " + ", ".join(missing))
        return 1
    total = sum(e["limit_s"] for e in commands)
    print(f"GPU check on {card}: {len(commands)} steps, at most {total} s")
    for entry in commands:
        print(f"  [{entry['step']:9s}] <= {entry['limit_s']:4d} s  {' '.join(entry['command'])}")
    if args.dry_run:
        print(f"dry run: nothing run; CSVs would go to {REPO / 'bench' / 'results'} (gpu_check_{slug}.csv, ...)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on this machine")
        return 1

    from deberta_fast.benchmark import harness

    rows = []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    for entry in commands:
        start = time.time()
        try:
            proc = subprocess.run(entry["command"], cwd=REPO, env=env, timeout=entry["limit_s"])
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {entry['limit_s']} s"
        seconds = time.time() - start
        print(f"== {entry['step']}: {status} in {seconds:.0f} s", flush=True)
        rows.append(dict(step=entry["step"], item="step", status=status, seconds=f"{seconds:.1f}", detail=""))
        if entry["junit"]:
            tests = _junit_rows(entry["junit"])
            counts = {s: sum(r["status"] == s for r in tests) for s in ("passed", "failed", "error", "skipped")}
            print(f"   tests: {counts}")
            rows.extend(r for r in tests if r["status"] != "passed")
            rows.append(dict(step="tests", item="counts", status=json.dumps(counts), seconds="", detail=""))
    for row in rows:
        row["gpu"] = card
    out = REPO / "bench" / "results" / f"gpu_check_{slug}.csv"
    harness.write_csv(rows, str(out))
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in rows if r["item"] == "step") else 1


if __name__ == "__main__":
    sys.exit(main())
