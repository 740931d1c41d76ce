"""GPU-readiness table from the compile-only layer: per kernel x target x dtype, what the compiled kernels need.

    python -m deberta_fast.benchmark.gpu_readiness [--jobs 2] [--from-json records.json]

Compiles every case of ``deberta_fast.benchmark.triton_compile`` (the same cases as tests/test_triton_compile.py,
cold cache), writes every compiled kernel as a row of bench/results/gpu_readiness.csv and prints a markdown table
with one row per kernel x target x dtype: the compiled variants, registers (max), spill bytes (max), static shared
memory (max, KiB, against the target's opt-in limit), tensor-core SASS instructions (min over variants with a
``tl.dot``), the num_warps / num_stages seen, and whether every variant passes the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

from deberta_fast.benchmark import harness, triton_compile

COLUMNS = ("kernel", "target", "dtype", "variants", "registers", "spill bytes", "shared KiB", "limit KiB",
           "tensor-core instr.", "warps/stages", "checks")


def summarize(records: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for record in records:
        if record.get("kernel"):
            name = record["kernel"]
            if name in ("_keep_mask_kernel",):  # two kernels of that name: counter_rng's and attention's
                name = f"{record.get('module', '?')}.{name}"
            groups[(name, record["target"], record["dtype"])].append(record)
    rows = []
    target_order = list(triton_compile.TARGETS)
    for (kernel, target, dtype), group in sorted(groups.items(), key=lambda item: (
            item[0][0], target_order.index(item[0][1]), triton_compile.DTYPES.index(item[0][2]))):
        fresh = [r for r in group if r.get("registers") is not None]
        dots = [r["tensor_core_instructions"] for r in group if r.get("has_dot")]
        failures = sum(bool(triton_compile.check_record(r)) for r in group)
        rows.append({
            "kernel": kernel, "target": target, "dtype": dtype, "variants": len(group),
            "registers": max((r["registers"] for r in fresh), default="-"),
            "spill bytes": max((r["spill_stores"] or 0 for r in fresh), default="-"),
            "shared KiB": round(max(r["shared"] for r in group) / 1024, 1),
            "limit KiB": triton_compile.TARGETS[target][1] // 1024,
            "tensor-core instr.": min(dots) if dots else "no dot",
            "warps/stages": " ".join(sorted({f"{r['num_warps']}/{r['num_stages']}" for r in group})),
            "checks": f"{failures} fail" if failures else "ok",
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    parser.add_argument("--from-json", default=None, help="records written by triton_compile --json (no compiling)")
    parser.add_argument("--out", default=os.path.join(harness.results_dir(), "gpu_readiness.csv"))
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as handle:
            records = json.load(handle)
    else:
        started = time.time()
        records = triton_compile.run_cases(triton_compile.all_cases(), jobs=args.jobs)
        print(f"compiled {len(records)} kernels in {time.time() - started:.0f} s", file=sys.stderr)
    import triton

    revision = harness.git_revision()
    csv_rows = []
    for record in records:
        row = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in record.items()}
        row.update(problems="; ".join(triton_compile.check_record(record)), triton=triton.__version__,
                   git=revision)
        csv_rows.append(row)
    harness.write_csv(csv_rows, args.out)
    print(harness.format_table(summarize(records), COLUMNS))
    errors = [r for r in records if r.get("error")]
    for record in errors:
        print(f"compile failure: {record['case']}: {record['error'][:300]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
