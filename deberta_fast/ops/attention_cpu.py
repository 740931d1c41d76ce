"""Native CPU backend of disentangled attention: the C++ op in ``csrc/`` (tiled, online softmax, O(L·D) memory).

The op is compiled with ``torch.utils.cpp_extension`` against the installed torch the first time a call asks for it
(never at import), cached per user under a directory keyed by the sources, the compiler flags and the torch version,
and registered through ``torch.library`` as ``torch.ops.deberta_fast_cpu.disentangled_attention_{forward,backward}``
(CPU kernels in C++, autograd and fake-tensor rules here). When it cannot be built (no compiler, no ninja, ...) the
build error becomes the reason that ``auto`` logs once before falling back to the reference.

Served: fp32 / bf16 / fp16 CPU tensors (computed in fp32 tiles, returned in the input dtype; the forward pass of bf16
calls without dropout multiplies its tiles in bf16 with fp32 accumulation where the CPU has bf16 dot products, see
csrc/bf16_tiles.h), c2p, p2c, both or no
positional term (bucketed or not), a [B, L] token mask or a [B, 1|H, L, L] pair mask with transformers' empty-row
behaviour, prefix keys, positional tables with batch dimension 1 or B, any scale, and attention dropout
(0 <= dropout_p < 1) from a counter-based generator (``deberta_fast.ops.attention_dropout``): the keep decision of
every probability is Philox of (seed, b·H + h, query, key), the stream of the Triton kernels, regenerated in the
backward pass, never stored. The seed is drawn per call from torch's default CPU generator, so ``torch.manual_seed``
makes runs repeatable. It is not transformers' bernoulli stream: the ``reference`` backend reproduces transformers'
masks exactly. Not served (the reference runs them): output_attentions, dropout_p >= 1, empty sequences.

Memory: O(L·D) per head plus, per group of heads in flight, the [L, W] positional tables (W <= 2S slots), bounded by a
64 MiB budget. That workspace is reused across calls and stays allocated for the life of the process (fresh pages
would be faulted in on every call), as does a small per-thread tile scratch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import native_cache, native_op
from .attention_dropout import draw_seed
from .dispatch import logger
from .positions import RelativePositionSpec, distance_slot_table, host_constants, saturated_slots

NAMESPACE = "deberta_fast_cpu"
CACHE_ENV_VAR = "DEBERTA_FAST_CACHE_DIR"
_SOURCE_SUFFIXES = (".cpp", ".h")
_BUILD_LOCK = threading.Lock()  # one build and one registration even when threads race to the first call


@dataclass(frozen=True)
class BuildStatus:
    """Outcome of the one build attempt of a process: ``error`` is empty when the op is registered."""

    error: str = ""
    library: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def source_dir() -> Path | None:
    """The csrc/ folder: installed as ``deberta_fast/csrc`` (wheel) or next to the package (source tree)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "disentangled_attention.cpp").is_file():
            return candidate
    return None


def compile_flags() -> list[str]:
    """-O3, OpenMP (at::parallel_for is inlined into the extension) and the ISA of at::vec.

    The vector ISA follows torch's own runtime choice (``torch.backends.cpu.get_cpu_capability()``, which honours
    ATEN_CPU_CAPABILITY), never -march=native; it is part of the cache key, so a build is only reused on a CPU with
    the same capability.
    """
    flags = ["-O3", "-fno-math-errno"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64"):
        if capability == "AVX512":
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        elif capability == "AVX2":
            flags += ["-mavx2", "-mfma", "-mf16c"]
        else:
            capability = "DEFAULT"
    elif capability not in ("DEFAULT",):
        capability = "DEFAULT"
    flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return flags


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deberta_fast"


def build_key(sources: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:16]


def extension() -> BuildStatus:
    """Builds (or loads the cached build of) the native op once per process and registers its Python rules."""
    with _BUILD_LOCK:
        return _build_once()


@functools.lru_cache(maxsize=None)
def _build_once() -> BuildStatus:
    directory = source_dir()
    if directory is None:
        return BuildStatus(error="its C++ sources (csrc/) are not installed with this copy of deberta_fast")
    try:
        sources = sorted(p for p in directory.iterdir() if p.suffix in _SOURCE_SUFFIXES)
        flags = compile_flags()
        key = build_key(sources, flags)
        # Built in a child process with a time limit, staged and verified (size + sha256) before it is loaded:
        # see native_cache.py for what holds after a crash at any point.
        library = native_cache.build_or_load(
            cache_root() / "cpu_ext_v2", key, name=f"deberta_fast_cpu_{key}",
            sources=[str(p) for p in sources if p.suffix == ".cpp"], cflags=flags,
            ldflags=["-fopenmp"] if sys.platform.startswith("linux") else [], include_paths=[str(directory)],
        )
        torch.ops.load_library(str(library))
    except Exception as error:  # any build or load failure: the reference serves instead
        message = " ".join(str(error).split())
        if len(message) > 600:
            message = message[:600] + " ..."
        return BuildStatus(error=f"{type(error).__name__}: {message}")
    _register_python_rules()
    return BuildStatus(library=str(library))


def _register_python_rules() -> None:
    forward = f"{NAMESPACE}::disentangled_attention_forward"
    backward = f"{NAMESPACE}::disentangled_attention_backward"

    @torch.library.register_fake(forward)
    def _forward_fake(query, key, value, pos_key, pos_query, token_mask, slot_table, softmax_scale, num_prefix_keys,
                      pair_mask=None, seed=None, dropout_p=0.0):
        batch, heads, length, _ = query.shape
        out = query.new_empty((batch, length, heads, value.shape[-1])).permute(0, 2, 1, 3)
        return out, query.new_empty((batch, heads, length), dtype=torch.float32)

    @torch.library.register_fake(backward)
    def _backward_fake(grad_out, query, key, value, pos_key, pos_query, token_mask, slot_table, out, lse,
                       softmax_scale, num_prefix_keys, pair_mask=None, seed=None, dropout_p=0.0):
        def heads_major(t):
            return t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).permute(0, 2, 1, 3)

        # The kernel allocates the positional gradients with empty_like (the layout of each table): same strides here.
        dpk = torch.empty_like(pos_key) if pos_key is not None else query.new_empty((0,))
        dpq = torch.empty_like(pos_query) if pos_query is not None else query.new_empty((0,))
        return heads_major(query), heads_major(key), heads_major(value), dpk, dpq

    def setup_context(ctx, inputs, output):
        (query, key, value, pos_key, pos_query, token_mask, slot_table, softmax_scale, num_prefix_keys, pair_mask,
         seed, dropout_p) = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, pos_key, pos_query, token_mask, slot_table, out, lse, pair_mask, seed)
        ctx.softmax_scale = softmax_scale
        ctx.num_prefix_keys = num_prefix_keys
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # lse has no gradient: no zero [B, H, L] tensor is built for it

    def backward_rule(ctx, grad_out, grad_lse):
        query, key, value, pos_key, pos_query, token_mask, slot_table, out, lse, pair_mask, seed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dpk, dpq = torch.ops.deberta_fast_cpu.disentangled_attention_backward(
            grad_out, query, key, value, pos_key, pos_query, token_mask, slot_table, out, lse,
            ctx.softmax_scale, ctx.num_prefix_keys, pair_mask, seed, ctx.dropout_p,
        )
        return (dq, dk, dv, dpk if pos_key is not None else None, dpq if pos_query is not None else None,
                None, None, None, None, None, None, None)

    torch.library.register_autograd(forward, backward_rule, setup_context=setup_context)


def _slot_table(length, spec: RelativePositionSpec) -> torch.Tensor:
    """int32 [2L - 1] slots of the distances -(L-1) .. L-1 (positions.distance_slot_table), cached per
    (length, spec) in eager mode so that a model's layers do not recompute the float32 log buckets on every call.
    While compiling or exporting the table is built in the graph instead (the length may be symbolic)."""
    if torch.compiler.is_compiling():
        return distance_slot_table(length, spec).to(torch.int32)
    return _cached_slot_table(length, spec)


@functools.lru_cache(maxsize=64)
def _cached_slot_table(length: int, spec: RelativePositionSpec) -> torch.Tensor:
    # Built outside inference mode: the cached table is saved for backward by later calls that track gradients.
    # Read only.
    with torch.inference_mode(False):
        return distance_slot_table(length, spec).to(torch.int32)


@torch.compiler.assume_constant_result
def _largest_slot_step(spec: RelativePositionSpec) -> int:
    """Largest slot increase between neighbouring distances over every distance (a property of the config alone,
    evaluated once per spec in Python); > 1 when max_relative_positions is close to position_buckets / 2 (the log
    buckets then skip slots), which the native op's tiling does not handle."""
    return _largest_slot_step_of(spec)


@functools.lru_cache(maxsize=64)
def _largest_slot_step_of(spec: RelativePositionSpec) -> int:
    # Slots are monotone in the distance and saturate within +-saturation_distance: that table has every step.
    with host_constants():
        table = saturated_slots(spec)
        return int((table[1:] - table[:-1]).max())


@torch.compiler.assume_constant_result
def build_error() -> str:
    """Empty when the native op is registered, else why it could not be built (a constant for torch.compile)."""
    return extension().error


def unsupported_reasons(
    query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p, output_attentions,
    num_prefix_keys,
) -> list[str]:
    """Why the native CPU op cannot serve ``call`` (the argument tuple of ``disentangled_attention``)."""
    reasons = native_op.tensor_reasons(query)
    if output_attentions:
        reasons.append("output_attentions=True needs the attention probabilities, which the fused op never stores")
    if not 0.0 <= dropout_p < 1.0:
        reasons.append(f"dropout_p must be in [0, 1); got {dropout_p}")
    if attention_mask is not None and attention_mask.is_complex():
        reasons.append(f"attention_mask dtype {attention_mask.dtype} is not supported")
    if query.shape[2] == 0:  # a guard on a symbolic length, not a data-dependent decision
        reasons.append("the sequence is empty (L = 0)")
    elif spec is not None and spec.any_position_term and _largest_slot_step(spec) > 1:
        reasons.append(f"the log buckets skip slots (position_buckets={spec.position_buckets}, "
                       f"max_relative_positions={spec.max_relative_positions}): neighbouring distances more than "
                       "one slot apart are not supported by the native op")
    return native_op.with_build_reason(reasons, build_error)


def run(
    query, key, value, pos_key, pos_query, attention_mask, spec, softmax_scale, dropout_p, output_attentions,
    num_prefix_keys,
):
    """Disentangled attention on the native op; returns (out [B, H, L, Dv], None). Inputs as validated by
    ``deberta_fast.ops.attention.check_attention_inputs`` and accepted by ``unsupported_reasons``."""
    native_op.require_built("disentangled attention", build_error)
    c2p = spec is not None and spec.c2p
    p2c = spec is not None and spec.p2c
    slot_table = _slot_table(query.shape[2], spec) if (c2p or p2c) else None
    pair = attention_mask is not None and attention_mask.dim() == 4
    seed = draw_seed() if dropout_p > 0.0 else None
    out, _ = torch.ops.deberta_fast_cpu.disentangled_attention_forward(
        query, key, value, pos_key if c2p else None, pos_query if p2c else None, None if pair else attention_mask,
        slot_table, float(softmax_scale), int(num_prefix_keys), attention_mask if pair else None, seed,
        float(dropout_p),
    )
    return out, None


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, length: int, num_keys: int,
                      dropout_p: float) -> torch.Tensor:
    """bool [B, H, L, P + L]: where the native op keeps attention probability (b, h, i, k) for the int64 [1] ``seed``
    (computed by the op's own C++ generator; tests and debugging, O(B·H·L·(P + L)) memory)."""
    status = extension()
    if not status.ok:
        raise RuntimeError(f"the native CPU op of disentangled attention could not be built: {status.error}")
    keep = torch.ops.deberta_fast_cpu.dropout_keep_mask(seed, batch * heads, length, num_keys, float(dropout_p))
    return keep.view(batch, heads, length, num_keys)

