"""Compile-only checks of every Triton kernel for real NVIDIA targets, on this CPU machine.

The interpreter the other tests run under never compiles a kernel. Here every kernel of triton_kernels/ is
compiled through its production launcher for sm_80, sm_90, sm_100 and sm_120 from a cold Triton cache (in worker
processes without TRITON_INTERPRET; see deberta_fast/benchmark/triton_compile.py), over a pairwise design of
the constexpr branches production reaches and every autotune config / tile config it can pick. Each compiled
kernel must: compile; fit the target's opt-in static shared memory; when fp16/bf16 and holding a tl.dot, show
tensor-core instructions (HMMA / HGMMA / tcgen05) in its SASS and spill no register (the attention backward
included); fp32 spills are recorded in the README's readiness table, not failed.
"""

from __future__ import annotations

import ast
import json
import os
import time
from collections import defaultdict

import pytest

from deberta_fast.benchmark import triton_compile as tc

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
CASES = tc.all_cases()
IDS = [f"{i:03d}-{case.label}" for i, case in enumerate(CASES)]

@pytest.fixture(scope="module")
def compiled():
    """Every case compiled once (two worker processes, one fresh cache for the run): records by case label."""
    started = time.time()
    records = tc.run_cases(CASES, jobs=2)
    by_case = defaultdict(list)
    for record in records:
        by_case[record["case"]].append(record)
    print(f"\ncompile layer: {len(CASES)} cases, {len(records)} kernels in {time.time() - started:.0f} s")
    dump = os.environ.get("DEBERTA_FAST_COMPILE_RECORDS")
    if dump:  # for python -m deberta_fast.benchmark.gpu_readiness --from-json
        with open(dump, "w") as handle:
            json.dump(records, handle, default=str)
    return by_case


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_case_compiles_within_the_target_limits(compiled, case):
    records = compiled[case.label]
    assert records, f"{case.label}: no kernel was compiled"
    failures = [f"{r.get('kernel')}: {p}" for r in records for p in tc.check_record(r)]
    assert not failures, "\n".join(failures)


def _jit_kernels() -> set[tuple[str, str]]:
    """(module, name) of every @triton.jit function named *_kernel in triton_kernels/ (read from the sources)."""
    found = set()
    for name in sorted(os.listdir(KERNEL_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(KERNEL_DIR, name), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "triton.jit" in ast.unparse(d) for d in node.decorator_list):
                found.add((name[:-3], node.name))
    return found


def test_every_kernel_is_compiled_for_every_target_and_dtype(compiled):
    kernels = _jit_kernels()
    assert len(kernels) >= 11
    seen = defaultdict(set)
    for records in compiled.values():
        for r in records:
            if r.get("kernel"):
                seen[(r["module"], r["kernel"])].add((r["target"], r["dtype"]))
    for kernel in sorted(kernels):
        targets = {t for t, _ in seen[kernel]}
        assert targets == set(tc.TARGETS), f"{kernel}: compiled for {sorted(targets)} only"
        if kernel[1] in ("_keep_mask_kernel", "_slots_kernel"):
            continue  # dtype-free (integer masks and slots)
        dtypes = {d for _, d in seen[kernel]}
        assert dtypes == set(tc.DTYPES), f"{kernel}: compiled for {sorted(dtypes)} only"


def _autotuned():
    from deberta_fast.triton_kernels import fused_linear, lora_linear

    return {
        "_fused_linear_kernel": fused_linear._fused_linear_kernel,
        "_lora_fwd_kernel": lora_linear._lora_fwd_kernel,
        "_lora_down_kernel": lora_linear._lora_down_kernel,
        "_lora_bwd_dx_kernel": lora_linear._lora_bwd_dx_kernel,
        "_lora_bwd_weight_kernel": lora_linear._lora_bwd_weight_kernel,
    }


def _config_key(kwargs: dict, warps, stages) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kwargs.items())) + (("num_warps", str(warps)),
                                                                     ("num_stages", str(stages)))


def test_every_autotune_config_is_compiled_on_sm80_and_sm90(compiled):
    """For the two promised targets, every config of each dtype's list (production's pruning) is compiled."""
    seen = defaultdict(set)
    for records in compiled.values():
        for r in records:
            if r.get("kernel"):
                key = _config_key({k: v for k, v in r["constexprs"].items() if k.startswith(("BLOCK_", "GROUP_"))},
                                  r["num_warps"], r["num_stages"])
                seen[(r["kernel"], r["target"], r["dtype"])].add(key)
    for name, tuner in _autotuned().items():
        for kind, dtypes in (("half", ("float16", "bfloat16")), ("fp32", ("float32",))):
            wanted = {_config_key(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs if c.kind == kind}
            assert wanted, f"{name}: no {kind} configs"
            for target in tc.ALL_CONFIG_TARGETS:
                for dtype in dtypes:
                    missing = wanted - seen[(name, target, dtype)]
                    assert not missing, f"{name} {target} {dtype}: configs never compiled: {sorted(missing)}"


def test_attention_branches_are_all_reached(compiled):
    """Every constexpr value production passes to the attention kernels appears in a compiled kernel."""
    values = defaultdict(set)
    for records in compiled.values():
        for r in records:
            if r.get("family") == "attention" and r.get("kernel"):
                for name in ("HAS_C2P", "HAS_P2C", "BUCKETED", "HAS_MASK", "DROPOUT", "PREC", "BLOCK_D"):
                    values[(r["kernel"], name)].add(r["constexprs"].get(name))
                values[(r["kernel"], "pos")].add((r["constexprs"]["HAS_C2P"], r["constexprs"]["HAS_P2C"]))
    for kernel in ("_disentangled_fwd_kernel", "_disentangled_bwd_dq_kernel", "_disentangled_bwd_dkv_kernel"):
        for name in ("HAS_C2P", "HAS_P2C", "BUCKETED", "HAS_MASK", "DROPOUT"):
            assert values[(kernel, name)] == {"True", "False"}, (kernel, name, values[(kernel, name)])
        assert len(values[(kernel, "pos")]) == 4
        assert values[(kernel, "PREC")] == {"ieee", "tf32"}
        assert values[(kernel, "BLOCK_D")] == {"32", "64", "128"}


def test_fused_linear_epilogues_are_all_reached(compiled):
    values = defaultdict(set)
    for records in compiled.values():
        for r in records:
            if r.get("kernel") == "_fused_linear_kernel":
                c = r["constexprs"]
                values["ACT"].add((c["ACT"], c["ACT_GRAD"]))
                for name in ("SCALE_MODE", "HAS_RESIDUAL", "STORE_PRE", "COLSUM_A", "HAS_BIAS", "EVEN_K"):
                    values[name].add(c[name])
    assert {a for a, g in values["ACT"] if g == "False"} == {"0", "1", "2", "3", "4"}
    assert {a for a, g in values["ACT"] if g == "True"} == {"0", "1", "2", "3", "4"}
    assert values["SCALE_MODE"] == {"0", "1", "2", "3"}
    for name in ("HAS_RESIDUAL", "STORE_PRE", "COLSUM_A", "HAS_BIAS", "EVEN_K"):
        assert values[name] == {"True", "False"}, name


def test_pairwise_design_covers_every_pair():
    factors = dict(a=[0, 1, 2], b=["x", "y"], c=[True, False], d=[5, 6, 7])
    rows = tc.pairwise(factors, valid=lambda r: not (r["a"] == 2 and r["b"] == "y"))
    assert all(not (r["a"] == 2 and r["b"] == "y") for r in rows)
    for first, second in [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]:
        for u in factors[first]:
            for v in factors[second]:
                if first == "a" and second == "b" and u == 2 and v == "y":
                    continue
                assert any(r[first] == u and r[second] == v for r in rows), (first, u, second, v)
    assert len(rows) < 3 * 2 * 2 * 3


# A hand-written listing in cuobjdump's format: an outer loop [0x0040, 0x00f0] (sm_80-style predicated branch)
# around an inner loop [0x0080, 0x00c0] (sm_100-style uniform-predicate branch).
_SASS_TWO_LOOPS = """
        /*0000*/                   STL [R1], R2 ;                       /* 0x0 */
        /*0040*/                   IADD3 R3, R3, 0x1, RZ ;              /* 0x0 */
        /*0050*/                   LDL R4, [R1] ;                       /* 0x0 */
        /*0080*/                   HMMA.16816.F32 R8, R12, R14, R8 ;    /* 0x0 */
        /*0090*/                   {INNER} ;                            /* 0x0 */
        /*00c0*/                   BRA.U !UP2, 0x80 ;                   /* 0x0 */
        /*00d0*/              @P0 BRA 0x100 ;                           /* 0x0 */
        /*00f0*/              @!P2 BRA 0x40 ;                           /* 0x0 */
        /*0100*/                   EXIT ;                               /* 0x0 */
"""


@pytest.mark.parametrize("inner,depth", [("NOP", 1), ("LDL.LU R5, [R1+0x4]", 2), ("STL.64 [R1+0x8], R6", 2)])
def test_spill_loop_depth_counts_the_loops_around_local_memory(inner, depth):
    assert tc.spill_loop_depth(_SASS_TWO_LOOPS.replace("{INNER}", inner)) == depth
    assert tc.spill_loop_depth("/*0000*/ IADD3 R3, R3, 0x1, RZ ; /*0010*/ EXIT ;") is None


def test_any_fp16_or_bf16_spill_fails_the_check_and_fp32_spills_are_recorded():
    record = dict(kernel="_disentangled_bwd_dq_kernel", target="sm_90", dtype="float16", shared=1024, has_dot=True,
                  tensor_core_instructions=8, spill_stores=0, spill_loop_depth=None, error=None)
    assert tc.check_record(record) == []
    problems = tc.check_record(dict(record, spill_stores=4, spill_loop_depth=1))
    assert len(problems) == 1 and "4 bytes of register spill stores" in problems[0] and "1 loops deep" in problems[0]
    assert tc.check_record(dict(record, dtype="bfloat16", spill_stores=4)) != []
    assert tc.check_record(dict(record, dtype="float32", spill_stores=4096, spill_loop_depth=2)) == []
    assert any("no ptxas -v spill report" in p for p in tc.check_record(dict(record, spill_stores=None)))
