"""Compile-only check of every Triton kernel for real NVIDIA targets, on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernels) never runs Triton's compiler, so
it cannot see compile errors, shared-memory overflows, register spills or a dot that misses the tensor cores. This
module compiles the kernels for sm_80 / sm_90 / sm_100 / sm_120 through the **production launchers**
(``disentangled_attention_forward`` / ``_backward``, ``lora_forward`` / ``lora_backward``, ``fused_linear``, the
RNG and slot helpers) with small CPU tensors, under a stand-in Triton driver that reports the target GPU, lets
autotuning compile every config that production's pruning keeps, and records each launch instead of running it.

Each compiled kernel becomes a record (kernel, target, dtype, constexprs, num_warps / num_stages, registers, spill
bytes from ``ptxas -v``, static shared memory, tensor-core instructions counted in the SASS of the cubin with the
``cuobjdump`` shipped in the triton wheel). ``check_record`` turns a record into the list of violated rules.

The compile work runs in worker processes started with a clean environment (TRITON_INTERPRET unset: the
interpreter flag is read when triton decorates the kernels, so a process that ever imported triton under the
interpreter cannot compile) and a fresh ``TRITON_CACHE_DIR`` per run (Triton's on-disk cache skips the front end).

    python -m deberta_fast.benchmark.triton_compile [--jobs 2] [--json out.json]     # run everything, print failures
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

# Opt-in static shared memory per block (CUDA programming guide, compute capabilities table), in bytes.
TARGETS = {
    "sm_80": (80, 163 * 1024),
    "sm_90": (90, 227 * 1024),
    "sm_100": (100, 227 * 1024),
    "sm_120": (120, 99 * 1024),
}
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (32, 48, 64, 80, 96, 128)
TENSOR_CORE_SASS = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA)\b")


@dataclass
class Case:
    """One production launcher call: ``family`` picks the launcher, ``params`` its options."""

    family: str
    target: str
    dtype: str
    params: dict = field(default_factory=dict)
    cost: float = 1.0  # rough relative compile cost, for scheduling the biggest first

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.family}[{self.target},{self.dtype},{opts}]"


# ----------------------------------------------------------------------------------------------------------------
# pairwise coverage
# ----------------------------------------------------------------------------------------------------------------


def pairwise(factors: dict[str, list], valid=None, free=(), groups=()) -> list[dict]:
    """A small list of rows covering every pair of values of any two factors (greedy, deterministic).

    ``valid(row) -> bool`` drops impossible combinations (their pairs are then not required); ``free``: pairs of
    factor names whose combinations need not all appear; ``groups``: tuples of factor names whose every (valid)
    combination must appear, beyond pairs (a group may be ``(names, predicate)``: combinations among the rows the
    predicate accepts).
    """
    names = list(factors)
    free = {frozenset(pair) for pair in free}
    valid = valid or (lambda row: True)
    full = [dict(zip(names, values)) for values in itertools.product(*(factors[n] for n in names))]
    full = [row for row in full if valid(row)]

    def pairs_of(row):
        keys = {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2) if frozenset((a, b)) not in free}
        for group in groups:
            group_names, applies = group if callable(group[-1]) else (group, None)
            if applies is None or applies(row):
                keys.add(tuple((n, row[n]) for n in group_names))
        return frozenset(keys)

    candidates = [(row, pairs_of(row)) for row in full]
    uncovered = set().union(*(pairs for _, pairs in candidates)) if candidates else set()
    rows = []
    while uncovered:
        best, pairs = max(candidates, key=lambda item: len(item[1] & uncovered))
        rows.append(dict(best))
        uncovered -= pairs
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the cases production reaches
# ----------------------------------------------------------------------------------------------------------------


def attention_cases(targets=tuple(TARGETS)) -> list[Case]:
    """Forward + both backward kernels over positions (c2p / p2c / both / none), bucketed or not, token mask,
    dropout, prefix keys, head dims, dtypes, TF32 for fp32 and the tile configs the launchers pick (by length and
    from the tuned-tile table), pairwise."""
    factors = dict(
        target=list(targets), dtype=list(DTYPES), head_dim=list(HEAD_DIMS),
        pos=["both", "c2p", "p2c", "none"], bucketed=[True, False], mask=[True, False], dropout=[False, True],
        prefix=[0, 3], length=[160, 24, 12], tf32=[False, True],
    )
    rows = pairwise(factors, valid=lambda r: not (r["tf32"] and r["dtype"] != "float32"))
    cases = [Case("attention", r.pop("target"), r.pop("dtype"), r) for r in rows]
    # Every entry of the tuned-tile table the launchers read is a config production can pick.
    from deberta_fast.triton_kernels import attention_tiles

    for entry in attention_tiles.table_entries():
        if entry["target"] in targets:
            cases.append(Case("attention", entry["target"], entry["dtype"], dict(
                head_dim=entry["head_dim"], pos="both", bucketed=True, mask=True, dropout=entry["dtype"] != "float32",
                prefix=0, length=1024, tf32=False)))
    # The branch with the largest live set (both positional terms, token mask, dropout, prefix keys, head dim 128)
    # on every target in both half dtypes: the pairwise rows need not reach it, and it is where the backward
    # kernels' spills peak.
    for target in targets:
        for dtype in ("float16", "bfloat16"):
            cases.append(Case("attention", target, dtype, dict(
                head_dim=128, pos="both", bucketed=True, mask=True, dropout=True, prefix=3, length=160, tf32=False)))
    for case in cases:
        case.cost = (8.0 if case.dtype == "float32" else 2.0) * (2.0 if case.params["head_dim"] > 64 else 1.0)
    return cases


# The autotune config index is a factor: index i picks config i modulo the list's length
# (DEBERTA_FAST_AUTOTUNE_CONFIG); the half lists have 3 or 4 configs, the fp32 lists 1 or 2. Every (target, dtype,
# config) combination is required on the two targets the project promises; the newer targets compile the first
# config of each list. The config is paired with nothing else: a config changes tiles, not branches.
CONFIGS = [0, 1, 2, 3]
ALL_CONFIG_TARGETS = ("sm_80", "sm_90")


def _config_ok(row: dict) -> bool:
    if row["dtype"] == "float32" and row["config"] > 1:
        return False
    return row["target"] in ALL_CONFIG_TARGETS or row["config"] == 0


def _config_design(factors: dict, valid=None, free=(), all_kernels=None) -> list[dict]:
    """``all_kernels(row)``: the rows that launch every kernel of the family, where the configs are covered."""
    others = [name for name in factors if name not in ("target", "dtype", "config")]
    group = ("target", "dtype", "config")
    return pairwise(factors, lambda r: _config_ok(r) and (valid is None or valid(r)),
                    free=list(free) + [("config", name) for name in others],
                    groups=[(group, all_kernels) if all_kernels else group])


def lora_cases(targets=tuple(TARGETS)) -> list[Case]:
    """LoRA down / forward / backward dX / backward weights: one or three projections, rank paddings, dropout,
    biases, saved S, EVEN_K / EVEN_N both ways, every gradient combination; every autotune config of each dtype
    on sm_80 / sm_90 (``DEBERTA_FAST_AUTOTUNE_CONFIG``)."""
    factors = dict(
        target=list(targets), dtype=list(DTYPES), config=CONFIGS, proj=[1, 3], rank=[8, 32, 64],
        dropout=[False, True], bias=[True, False], k=[64, 72], grads=["x,a,b", "a,b", "x", "b"], partial=[False, True],
    )
    # Every config of every kernel: on rows that launch all four (dropout on: the down kernel; every gradient).
    rows = _config_design(factors, all_kernels=lambda r: r["dropout"] and r["grads"] == "x,a,b")
    cases = [Case("lora", r.pop("target"), r.pop("dtype"), r) for r in rows]
    for case in cases:
        case.cost = 3.0 if case.dtype != "float32" else 1.5
    return cases


def fused_linear_cases(targets=tuple(TARGETS)) -> list[Case]:
    """fused_linear as the bottleneck (down with each activation, up with each scale mode and the residual,
    backward dz with act' and the column sum) and IA³ use it; autotune configs as a pairwise factor."""
    factors = dict(
        target=list(targets), dtype=list(DTYPES), config=CONFIGS, role=["down", "up", "dz", "ia3"],
        activation=["none", "relu", "gelu", "silu", "tanh"], flag=[True, False], scale=["value", "scalar", "vector"],
        k=[64, 40],
    )

    def valid(r):
        if r["role"] in ("up", "ia3") and r["activation"] != "none":
            return False
        if r["role"] != "up" and r["scale"] != "vector":
            return False
        return True

    cases = [Case("fused_linear", r.pop("target"), r.pop("dtype"), r) for r in _config_design(factors, valid)]
    for case in cases:
        case.cost = 2.0 if case.dtype != "float32" else 1.0
    return cases


def rng_cases(targets=tuple(TARGETS)) -> list[Case]:
    """The counter-RNG keep mask, the attention dropout mask and the slot-table debug kernels."""
    cases = []
    for target in targets:
        for kind in ("counter_rng", "attention_dropout", "slots_bucketed", "slots_unbucketed"):
            cases.append(Case("rng", target, "float32", dict(kind=kind), cost=0.3))
    return cases


def all_cases(targets=tuple(TARGETS)) -> list[Case]:
    return attention_cases(targets) + lora_cases(targets) + fused_linear_cases(targets) + rng_cases(targets)


# ----------------------------------------------------------------------------------------------------------------
# worker side: stand-in driver, launcher calls, inspection
# ----------------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(cache_dir: str) -> None:
    """Process initialiser: a compiling (not interpreting) triton with a cold cache shared by this run."""
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before the compile worker could unset TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["DEBERTA_FAST_AUTOTUNE"] = "1"  # the configs production's pruning keeps (one per case: see run_case)
    import torch

    torch.set_num_threads(1)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


class _Launches:
    """What the stand-in driver saw: compiled kernels (with their ptxas logs) and launch errors."""

    def __init__(self):
        self.compiled = []
        self.launched = []  # kernel hashes, in launch order (a kernel cached in memory launches without compiling)
        self.errors = []
        self.log = io.StringIO()


# Worker-wide: what each compiled kernel (by Triton's hash) looked like, for cases that reuse it from memory.
_KERNELS: dict[str, dict] = {}


def _stand_in_driver(arch: int, launches: _Launches):
    """A Triton driver for a GPU that is not there: reports ``GPUTarget('cuda', arch, 32)``, accepts every launch
    without running it, and benchmarks autotune configs by compiling them once (recording, not hiding, failures)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 1 << 30, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}

        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024

        def unload_module(self, module):
            pass

    class StandIn(DriverBase):
        def __init__(self):
            self.utils = Utils()
            self.target = GPUTarget("cuda", arch, 32)

            def launcher_cls(src, metadata):
                return lambda *args, **kwargs: launches.launched.append(metadata.hash)

            self.launcher_cls = launcher_cls

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            # One device id per target: a JITFunction keeps its target and kernel cache per device.
            return arch

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                try:
                    kernel_call()
                except Exception as error:  # the autotuner would hide it: record first
                    launches.errors.append(f"{type(error).__name__}: {error}")
                    raise
                return [1.0, 1.0, 1.0] if quantiles else 1.0

            return bench

    return StandIn()


def _tensors(case: Case):
    import torch

    return torch, getattr(torch, case.dtype)


def _run_attention(case: Case) -> None:
    from deberta_fast.triton_kernels.disentangled_attention_bwd import disentangled_attention_backward
    from deberta_fast.triton_kernels.disentangled_attention_fwd import disentangled_attention_forward

    torch, dtype = _tensors(case)
    p = case.params
    batch, heads, length, hd, prefix = 2, 2, p["length"], p["head_dim"], p["prefix"]
    c2p, p2c = p["pos"] in ("both", "c2p"), p["pos"] in ("both", "p2c")
    buckets, max_rel = (256, 512) if p["bucketed"] else (-1, 512)
    span = buckets if buckets > 0 else max_rel
    # [B, L, H, D] buffers viewed as [B, H, L, D], the layout the model passes.
    q = torch.zeros(batch, length, heads, hd, dtype=dtype).transpose(1, 2)
    k = torch.zeros(batch, prefix + length, heads, hd, dtype=dtype).transpose(1, 2)
    table = torch.zeros(1, 2 * span, heads, hd, dtype=dtype).transpose(1, 2)
    mask = torch.ones(batch, length, dtype=torch.bool) if p["mask"] else None
    dropout = 0.1 if p["dropout"] else 0.0
    seed = torch.zeros(1, dtype=torch.int64) if p["dropout"] else None
    common = dict(c2p=c2p, p2c=p2c, position_buckets=buckets, max_relative_positions=max_rel, softmax_scale=0.125,
                  dropout_p=dropout, num_prefix_keys=prefix, allow_tf32=p["tf32"])
    out, lse = disentangled_attention_forward(q, k, k, table if c2p else None, table if p2c else None, mask, seed,
                                              **common)
    disentangled_attention_backward(torch.zeros_like(out), q, k, k, table if c2p else None, table if p2c else None,
                                    mask, seed, out, lse, **common)


def _run_lora(case: Case) -> None:
    from deberta_fast.triton_kernels.lora_linear import lora_backward, lora_forward

    torch, dtype = _tensors(case)
    p = case.params
    P, M, N, K, r = p["proj"], 96, 64, p["k"], p["rank"]
    x = torch.zeros(M, K, dtype=dtype)
    weights = [torch.zeros(N, K, dtype=dtype) for _ in range(P)]
    biases = [torch.zeros(N, dtype=dtype) if p["bias"] else None for _ in range(P)]
    # partial: only some projections carry a LoRA (q and v of a q/k/v launch).
    has = [not (p["partial"] and P == 3 and j == 1) for j in range(P)]
    As = [torch.zeros(r, K, dtype=dtype) if h else None for h in has]
    Bs = [torch.zeros(N, r, dtype=dtype) if h else None for h in has]
    scal = [2.0] * P
    threshold, keep_scale = (1 << 20, 1.0 / 0.9) if p["dropout"] else (0, 1.0)
    keys = [11, 12, 13][:P]
    grads = p["grads"].split(",")
    y, s = lora_forward(x, weights, biases, As, Bs, scal, keys, threshold, keep_scale, store_s="b" in grads)
    lora_backward(torch.zeros_like(y), x, weights, As, Bs, scal, s, keys, threshold, keep_scale,
                  need_dx="x" in grads, need_a="a" in grads, need_b="b" in grads)


def _run_fused_linear(case: Case) -> None:
    from deberta_fast.triton_kernels.fused_linear import fused_linear

    torch, dtype = _tensors(case)
    p = case.params
    M, K, N = 80, p["k"], 48
    a = torch.zeros(M, K, dtype=dtype)
    w = torch.zeros(N, K, dtype=dtype)
    bias = torch.zeros(N, dtype=dtype) if p["flag"] else None
    if p["role"] == "down":  # bottleneck down-projection, z saved when training
        fused_linear(a, w, bias=bias, activation=p["activation"], store_pre=not p["flag"])
    elif p["role"] == "up":  # bottleneck up-projection: scaling, residual
        scale = {"value": 0.5, "scalar": torch.ones(1, dtype=dtype), "vector": torch.ones(N, dtype=dtype)}[p["scale"]]
        fused_linear(a, w, bias=bias, scale=scale, residual=torch.zeros(M, N, dtype=dtype) if p["flag"] else None)
    elif p["role"] == "dz":  # bottleneck backward: dY · W_us ⊙ act'(z), Σ_rows dY
        up = torch.zeros(K, N, dtype=dtype)
        fused_linear(a, up, b_transposed=True, activation=p["activation"], act_grad_of=torch.zeros(M, N, dtype=dtype),
                     colsum_a=True)
    else:  # IA³: (x Wᵀ + b) ⊙ l
        fused_linear(a, w, bias=bias, scale=torch.ones(N, dtype=dtype), store_pre=p["flag"])


def _run_rng(case: Case) -> None:
    import torch

    from deberta_fast.triton_kernels import _common, counter_rng

    kind = case.params["kind"]
    if kind == "counter_rng":
        counter_rng.materialize_keep_mask(torch.zeros(40, 70, dtype=torch.int8), 5, 1 << 20)
    elif kind == "attention_dropout":
        _common.dropout_keep_mask(torch.zeros(1, dtype=torch.int64), 2, 2, 40, 43, 0.1)
    else:
        _common.distance_slots(100, 256 if kind == "slots_bucketed" else -1, 512, "cpu")


_RUNNERS = {"attention": _run_attention, "lora": _run_lora, "fused_linear": _run_fused_linear, "rng": _run_rng}


def _constexpr_repr(src) -> dict:
    names = src.fn.arg_names
    out = {}
    for key, value in src.constants.items():
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) else str(index)
        out[name] = str(value)
    return out


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w+\s*,\s*)?0x([0-9a-f]+)")
_LOCAL_MEMORY = re.compile(r"\b(?:LDL|STL)\b")


def spill_loop_depth(sass: str) -> int | None:
    """How many loops enclose the most deeply nested local-memory instruction (LDL / STL: register spills) of a
    ``cuobjdump -sass`` listing; None when there is none. A loop is the address range [target, branch] of a
    backward branch, so 0 means straight-line code before or after every loop."""
    instructions = [(int(address, 16), text) for address, text in _SASS_INSTRUCTION.findall(sass)]
    loops = []
    for address, text in instructions:
        match = _BRANCH_TARGET.search(text)
        if match and int(match.group(1), 16) <= address:
            loops.append((int(match.group(1), 16), address))
    depths = [sum(lo <= address <= hi for lo, hi in loops)
              for address, text in instructions if _LOCAL_MEMORY.search(text)]
    return max(depths) if depths else None


def _inspect(kernel_files: dict, ptxas_log: str) -> dict:
    """Registers / spills from the ptxas -v log, tensor-core SASS instructions from the cubin."""
    info = {"registers": None, "spill_stores": None, "spill_loads": None, "spill_loop_depth": None,
            "tensor_core_instructions": None, "has_dot": None}
    regs = _REGS.findall(ptxas_log)
    spills = _SPILL.findall(ptxas_log)
    if regs:
        info["registers"] = max(int(r) for r in regs)
    if spills:
        info["spill_stores"] = max(int(s) for s, _ in spills)
        info["spill_loads"] = max(int(lo) for _, lo in spills)
    cubin = next((path for name, path in kernel_files.items() if name.endswith(".cubin")), None)
    if cubin:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        info["tensor_core_instructions"] = len(TENSOR_CORE_SASS.findall(sass))
        info["spill_loop_depth"] = spill_loop_depth(sass)
        if info["registers"] is None:
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
            match = re.search(r"REG:(\d+)", usage)
            info["registers"] = int(match.group(1)) if match else None
    ttir = next((path for name, path in kernel_files.items() if name.endswith(".ttir")), None)
    if ttir:
        with open(ttir) as handle:
            info["has_dot"] = "tt.dot" in handle.read()
    return info


def run_case(case: Case) -> list[dict]:
    """Worker entry: run the case's launcher under the stand-in driver for its target; one record per compiled
    kernel (and one error record when the launcher or a compile failed)."""
    from triton import knobs
    from triton.runtime.driver import driver

    arch, _ = TARGETS[case.target]
    launches = _Launches()
    records = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        log = launches.log.getvalue()
        launches.log.seek(0)
        launches.log.truncate()
        launches.compiled.append((src, dict(metadata), dict(metadata_group), log, cache_hit))

    _reset_autotuners()
    knobs.compilation.listener = listener
    knobs.nvidia.dump_ptxas_log = True
    driver.set_active(_stand_in_driver(arch, launches))
    started = time.time()
    cpu_started = _cpu_seconds()
    error = None
    config = case.params.get("config")
    if config is None:
        os.environ.pop("DEBERTA_FAST_AUTOTUNE_CONFIG", None)
    else:
        os.environ["DEBERTA_FAST_AUTOTUNE_CONFIG"] = str(config)
    try:
        with contextlib.redirect_stdout(launches.log):
            _RUNNERS[case.family](case)
    except Exception as exc:  # reported as a failed record, with the compiler's message
        error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    finally:
        knobs.compilation.listener = None
        knobs.nvidia.dump_ptxas_log = False
    for src, metadata, files, log, cache_hit in launches.compiled:
        cubin = next((path for name, path in files.items() if name.endswith(".cubin")), None)
        log_path = f"{cubin}.ptxas.log" if cubin else None
        if not cache_hit and log_path:
            with open(log_path, "w") as handle:  # beside the cubin in the run's cache: for other workers' hits
                handle.write(log)
        elif cache_hit and log_path and os.path.exists(log_path):
            with open(log_path) as handle:
                log = handle.read()
        record = dict(
            family=case.family, kernel=src.name, module=src.fn.module.rsplit(".", 1)[-1],
            target=case.target, dtype=case.dtype,
            constexprs=_constexpr_repr(src), num_warps=metadata.get("num_warps"),
            num_stages=metadata.get("num_stages"), shared=metadata.get("shared"), cache_hit=cache_hit, error=None,
        )
        record.update(_inspect(files, log))
        _KERNELS[metadata["hash"]] = record
    seen = set()
    for kernel_hash in launches.launched + [m["hash"] for _, m, _, _, _ in launches.compiled]:
        if kernel_hash not in seen and kernel_hash in _KERNELS:
            seen.add(kernel_hash)
            records.append(dict(_KERNELS[kernel_hash], case=case.label))
    for message in launches.errors + ([error] if error else []):
        records.append(dict(case=case.label, family=case.family, kernel=None, target=case.target, dtype=case.dtype,
                            error=message))
    for record in records:
        record["case_seconds"] = round(time.time() - started, 2)
        record["case_cpu_seconds"] = round(_cpu_seconds() - cpu_started, 2)
    return records


def _reset_autotuners() -> None:
    """Forget every autotuner's choice: the next case may pick another config (or target) for the same key."""
    from triton.runtime.autotuner import Autotuner

    from deberta_fast.triton_kernels import fused_linear, lora_linear

    for module in (fused_linear, lora_linear):
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                value.cache.clear()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as a child process)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ----------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------


_RESULT = "@@deberta_fast_compile_result "


def _worker_loop() -> None:
    """Worker process: read one JSON case per stdin line, answer with one result line on stdout."""
    _init_worker(os.environ["DEBERTA_FAST_COMPILE_CACHE"])
    for line in sys.stdin:
        case = Case(**json.loads(line))
        try:
            records = run_case(case)
        except Exception as error:  # a broken case must not take the other cases down
            records = [dict(case=case.label, family=case.family, kernel=None, target=case.target, dtype=case.dtype,
                            error=f"{type(error).__name__}: {error}")]
        sys.stdout.write(_RESULT + json.dumps(records, default=str) + "\n")
        sys.stdout.flush()


def run_cases(cases: list[Case], jobs: int = 2, cache_dir: str | None = None) -> list[dict]:
    """Compile ``cases`` in ``jobs`` fresh worker processes (cold cache unless ``cache_dir`` is given), the most
    expensive first, each worker taking the next case when it is done."""
    import queue
    import threading

    owned = None
    if cache_dir is None:
        owned = tempfile.TemporaryDirectory(prefix="deberta_fast_triton_cache_")
        cache_dir = owned.name
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DEBERTA_FAST_COMPILE_CACHE"] = cache_dir
    todo: queue.Queue = queue.Queue()
    for case in sorted(cases, key=lambda c: -c.cost):
        todo.put(case)
    results: list[list[dict]] = []
    lock = threading.Lock()

    def serve():
        proc = subprocess.Popen([sys.executable, "-m", "deberta_fast.benchmark.triton_compile", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            while True:
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    break
                proc.stdin.write(json.dumps(asdict(case)) + "\n")
                proc.stdin.flush()
                for line in proc.stdout:
                    if line.startswith(_RESULT):
                        with lock:
                            results.append(json.loads(line[len(_RESULT):]))
                        break
                else:  # the worker died: report the case, start no more work in this thread
                    with lock:
                        results.append([dict(case=case.label, family=case.family, kernel=None, target=case.target,
                                             dtype=case.dtype, error=f"worker exited with {proc.wait()}")])
                    return
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait()

    try:
        threads = [threading.Thread(target=serve) for _ in range(max(1, jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        if owned is not None:
            owned.cleanup()
    return [record for batch in results for record in batch]


def check_record(record: dict) -> list[str]:
    """The rules a compiled kernel must satisfy (empty when it does)."""
    if record.get("error"):
        return [f"failed: {record['error']}"]
    problems = []
    limit = TARGETS[record["target"]][1]
    if record["shared"] is None or record["shared"] > limit:
        problems.append(f"static shared memory {record['shared']} B over the {record['target']} opt-in limit {limit} B")
    if record["dtype"] != "float32" and record.get("has_dot"):
        if not record.get("tensor_core_instructions"):
            problems.append("fp16/bf16 kernel with tl.dot has no tensor-core instruction (HMMA/HGMMA) in its SASS")
        if record.get("spill_stores") is None:
            problems.append("no ptxas -v spill report for this kernel")
        elif record["spill_stores"] > 0:
            depth = record.get("spill_loop_depth")
            problems.append(f"{record['spill_stores']} bytes of register spill stores"
                            + (f" (deepest spill instruction {depth} loops deep in the SASS)" if depth else ""))
    return problems


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--family", nargs="*", default=None, choices=list(_RUNNERS))
    parser.add_argument("--json", default=None, help="write every record to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_loop()
        return 0
    cases = [c for c in all_cases(tuple(args.targets)) if args.family is None or c.family in args.family]
    started = time.time()
    records = run_cases(cases, jobs=args.jobs)
    print(f"{len(cases)} cases, {len(records)} kernels compiled in {time.time() - started:.0f} s")
    failures = [(r, p) for r in records for p in check_record(r)]
    for record, problem in failures:
        print(f"FAIL {record.get('kernel')} {record['case']}: {problem}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
