"""A GEMM with the adapter epilogues: out = epilogue(A · Bᵀ), the building block of IA³ and the bottleneck.

    acc = A · Bᵀ                          A [M, K] (row stride stride_am); B[n, k] at n·stride_bn + k·stride_bk
    acc += bias                           HAS_BIAS                     bias [N]
    acc *= act'(aux)                      ACT_GRAD (aux [M, N] read: the saved pre-activation)
    aux = acc                             STORE_PRE (aux [M, N] written: pre-activation / pre-scale value)
    acc = act(acc)                        ACT ∈ none, relu, gelu (erf), silu, tanh
    acc *= scale                          SCALE_MODE: 1 a float argument, 2 a [1] tensor, 3 a [N] tensor
    acc += residual                       HAS_RESIDUAL                 residual [M, N]
    out = acc (in out's dtype)
    colsum[pid_m, k] = Σ_{rows of tile} A[:, k]     COLSUM_A (programs of column 0: a by-product of the loads)

Uses: IA³ y = (x Wᵀ + b) ⊙ l; bottleneck h = act(x W_dᵀ + b_d), y = residual + s ⊙ (h W_uᵀ + b_u);
bottleneck backward dz = (dY · diag(s) W_u) ⊙ act'(z) with Σ_rows dY on the side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import bucket, dot_dtype, dot_precision, make_configs, prune_by_dtype

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "swish": 3, "silu": 3, "tanh": 4}
SCALE_NONE, SCALE_VALUE, SCALE_SCALAR, SCALE_VECTOR = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    # exp-based: absolute error ~1 ulp of 1 everywhere (libdevice's tanh is not available in the interpreter).
    t = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -th, th)


@triton.jit
def activation(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = x * tl.sigmoid(x)
    elif ACT == 4:
        x = _tanh(x)
    return x


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz."""
    if ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        sig = tl.sigmoid(z)
        g = sig * (1.0 + z * (1.0 - sig))
    elif ACT == 4:
        th = _tanh(z)
        g = 1.0 - th * th
    else:
        g = tl.full(z.shape, 1.0, tl.float32)
    return g


def _tiles(*entries):
    return [(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), warps, stages)
            for bm, bn, bk, warps, stages in entries]


# Narrow N tiles serve the bottleneck's [rows, m] GEMMs (m = H/16 = 48 at base width), wide ones the H-wide
# up-projection and IA³. 128-row tiles take 8 warps: with 4 (and with 128 x 256 tiles) ptxas spills on sm_90
# (compile-only evidence, README "GPU readiness").
_CONFIGS = make_configs(
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    half=_tiles((128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4)),
    fp32=_tiles((64, 64, 32, 4, 2), (32, 64, 32, 4, 2)),
)


@triton.autotune(configs=_CONFIGS,
                 key=["M_BUCKET", "N", "K", "ACT", "ACT_GRAD", "HAS_RESIDUAL", "STORE_PRE", "COLSUM_A"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("a_ptr")},
                 # colsum holds per-row-tile partials whose count depends on BLOCK_M: zero it between tries.
                 reset_to_zero=["colsum_ptr"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fused_linear_kernel(
    a_ptr, b_ptr, bias_ptr, scale_ptr, residual_ptr, aux_ptr, out_ptr, colsum_ptr,
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_bk, scale_value,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_GRAD: tl.constexpr, STORE_PRE: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COLSUM_A: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk
    colsum_ptrs = colsum_ptr + pid_m.to(tl.int64) * K + offs_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            at = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if COLSUM_A:
            if pid_n == 0:
                part = tl.sum(tl.where(m_ok[:, None], at.to(tl.float32), 0.0), axis=0)
                tl.store(colsum_ptrs, part, mask=offs_k < K - k0)
        acc = tl.dot(at.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
        colsum_ptrs += BLOCK_K

    mn_ok = m_ok[:, None] & n_ok[None, :]
    tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT_GRAD:
        z = tl.load(aux_ptr + tile, mask=mn_ok, other=0.0).to(tl.float32)
        acc *= activation_grad(z, ACT)
    else:
        if STORE_PRE:
            tl.store(aux_ptr + tile, acc.to(aux_ptr.dtype.element_ty), mask=mn_ok)
        acc = activation(acc, ACT)
    if SCALE_MODE == 1:
        acc *= scale_value
    elif SCALE_MODE == 2:
        acc *= tl.load(scale_ptr).to(tl.float32)
    elif SCALE_MODE == 3:
        acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + tile, mask=mn_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mn_ok)


def fused_linear(a, b, *, b_transposed: bool = False, bias=None, activation: str = "none", act_grad_of=None,
                 store_pre: bool = False, scale=None, residual=None, colsum_a: bool = False, out_dtype=None):
    """Launch the kernel (see the module docstring).

    a [M, K] (unit column stride); b [N, K], or [K, N] when ``b_transposed`` (contiguous either way).
    scale: None, a float, or a [1] / [N] tensor. act_grad_of: the saved pre-activation [M, N] (backward mode:
    multiply by act'(it) instead of applying act). Returns (out [M, N], pre [M, N] or None, colsum [K] fp32 or
    None).
    """
    M, K = a.shape
    N = b.shape[1] if b_transposed else b.shape[0]
    b = b.contiguous()
    stride_bn, stride_bk = (1, N) if b_transposed else (K, 1)
    if a.stride(1) != 1:
        a = a.contiguous()
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    pre = torch.empty((M, N), dtype=out.dtype, device=a.device) if store_pre else None
    if M == 0:
        return out, pre, (torch.zeros(K, dtype=torch.float32, device=a.device) if colsum_a else None)
    if scale is None:
        scale_mode, scale_value, scale_ptr = SCALE_NONE, 1.0, a
    elif isinstance(scale, torch.Tensor):
        scale_mode = SCALE_SCALAR if scale.numel() == 1 else SCALE_VECTOR
        scale_value, scale_ptr = 1.0, scale.contiguous()
    else:
        scale_mode, scale_value, scale_ptr = SCALE_VALUE, float(scale), a
    residual = residual.contiguous() if residual is not None else None
    aux = act_grad_of.contiguous() if act_grad_of is not None else pre
    # Partial sums per row tile; the row-tile count depends on the autotuned BLOCK_M, so size for the smallest.
    colsum = torch.zeros((triton.cdiv(M, 32), K) if colsum_a else (1,), dtype=torch.float32, device=a.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _fused_linear_kernel[grid](
        a, b, bias if bias is not None else a, scale_ptr, residual if residual is not None else a,
        aux if aux is not None else a, out, colsum,
        M, N, K, bucket(M), a.stride(0), stride_bn, stride_bk, scale_value,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], ACT_GRAD=act_grad_of is not None,
        STORE_PRE=store_pre, SCALE_MODE=scale_mode, HAS_RESIDUAL=residual is not None, COLSUM_A=colsum_a,
        DOT_DTYPE=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
    )
    return out, pre, (colsum.sum(0) if colsum_a else None)
