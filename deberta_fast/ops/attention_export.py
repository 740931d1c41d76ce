"""Disentangled attention in plain tensor ops that both ONNX exporters lower to standard ONNX ops.

``deberta_fast.ops.attention`` routes here while ``torch.onnx.export`` traces a model (TorchScript exporter or
dynamo exporter), before any backend dispatch: the custom ops of the native and Triton backends have no ONNX
translation, and dispatch decides from values the exporters cannot see. Same contract and semantics as
``attention.py`` (transformers 5.24's DisentangledSelfAttention); the graph stays valid for any B and L.

O(L) position handling: no [L, L] index tensor (transformers' export builds one, expanded to [B·H, L, L] int64).

- Slots. slot(d) is constant for |d| >= R (the saturation radius of the spec: the clamp to [0, 2S - 1] or a
  constant log bucket; R = 512 for 256 buckets and max_relative_positions 512), so the host computes
  ``table[k] = slot(k - R)`` once per spec, k = 0 .. 2R, with the same torch float32 formula as every backend, and
  the graph picks the 2R + 1 rows of Pk / Pq at those slots with a constant index: nothing depends on L.
- Band scores. With r = min(R, L - 1), Cb = s·Q · Pk_bandᵀ [B, H, L, 2r + 1] (column k at distance i - j = r - k)
  and Eb = s·K · Pq_bandᵀ (column k at distance j - i = r - k, rows = keys): the positional scores of every
  distance up to r; farther distances take the end columns.
- Placement on the diagonals without an index ("skew"). Edge padding (Pad, mode edge) turns each row of Cb into
  2L columns, column u at distance L - 1 - u. Then c2p(i, j) = P[i, L - 1 - i + j]:
  in the row-major flat buffer F of P that element sits at i·(2L - 1) + (L - 1) + j, so
  F[L - 1 : L - 1 + L·(2L - 1)] viewed as [L, 2L - 1] holds c2p in its first L columns: a Slice, a Reshape and a
  Slice. The same placement of Eb gives p2c transposed (row = key j), transposed back.

The key-padding mask enters the content score as one more column of the score GEMM (a 1 in every query, the
mask bias in every key); a padded query, whose whole row transformers fills with finfo.min, becomes the mean of all
values.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from .positions import RelativePositionSpec, slots_of_distances

# Largest saturation radius served: a spec whose slots still change beyond it (a tiny number of log buckets with a
# huge max_relative_positions) would need a slot table this long, and raises instead.
MAX_SATURATION_RADIUS = 1 << 16


@contextlib.contextmanager
def _outside_export_tracing():
    """Run real (not fake, not traced) tensor code while an exporter traces the model: the slot table is a
    constant of the graph, computed on the host with torch's own float32 log as every backend computes it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)  # TorchScript tracer
    try:
        with unset_fake_temporarily(), disable_proxy_modes_tracing():  # torch.export / dynamo exporter
            yield
    finally:
        torch._C._set_tracing_state(tracing_state)


def _radius_bound(spec: RelativePositionSpec) -> int:
    """A distance beyond which slot(d) cannot change any more (found on the host, then verified)."""
    if not spec.bucketed:
        return spec.att_span + 1
    mid = spec.position_buckets // 2
    if mid <= 1:
        return mid + 2  # the log term is multiplied by mid - 1 = 0: buckets ±mid beyond |d| = mid
    # |bucket(d)| >= S (slot clamped) once log(d / mid) / log((max_pos - 1) / mid) · (mid - 1) >= S - mid.
    ratio = (spec.max_relative_positions - 1) / mid
    exponent = (spec.att_span - mid) / (mid - 1)
    log_bound = math.log(mid) + exponent * math.log(ratio)
    if log_bound > math.log(MAX_SATURATION_RADIUS):
        return MAX_SATURATION_RADIUS
    return min(MAX_SATURATION_RADIUS, int(math.exp(log_bound) * 1.01) + 2)


@functools.lru_cache(maxsize=64)
def saturated_slot_table(spec: RelativePositionSpec) -> tuple[int, tuple[int, ...]]:
    """(R, slots): slots[k] = slot(k - R) for k = 0 .. 2R, and slot(d) = slot(±R) for every |d| >= R.

    Raises ValueError when the slots of ``spec`` keep changing beyond MAX_SATURATION_RADIUS.
    """
    bound = _radius_bound(spec)
    with _outside_export_tracing():
        slots = slots_of_distances(torch.arange(-bound, bound + 1, dtype=torch.long), spec).tolist()
    right, left = slots[bound:], slots[bound::-1]  # slot(d) and slot(-d) for d = 0 .. bound
    constant_beyond = (
        (right[-1] == spec.num_slots - 1 and left[-1] == 0)  # clamped: monotone slots stay there
        or (spec.bucketed and spec.position_buckets // 2 <= 1)
        or not spec.bucketed
    )
    if not constant_beyond:
        raise ValueError(
            f"ONNX export: the relative-position slots of position_buckets={spec.position_buckets}, "
            f"max_relative_positions={spec.max_relative_positions} keep changing beyond |i - j| = {bound}; export "
            f"supports specs whose slots saturate within {MAX_SATURATION_RADIUS} positions"
        )

    def first_of_last_run(values):
        index = len(values) - 1
        while index > 0 and values[index - 1] == values[-1]:
            index -= 1
        return index

    radius = max(first_of_last_run(right), first_of_last_run(left), 1)
    return radius, tuple(slots[bound - radius : bound + radius + 1])


def _band_rows(table: torch.Tensor, spec: RelativePositionSpec, reverse: bool) -> torch.Tensor:
    """table [1 or B, H, 2S, D] -> [1 or B, H, 2R + 1, D]: row k is the table row of distance k - R (R - k when
    ``reverse``), read through the constant slot table (no index depends on L)."""
    radius, slots = saturated_slot_table(spec)
    index = torch.tensor(slots[::-1] if reverse else slots, dtype=torch.long, device=table.device)
    return torch.index_select(table, 2, index)


def _toeplitz(band: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, H, L, 2R + 1] band scores (column k at distance R - k) -> [N, H, L, L]: out[.., i, j] = band score of
    row i at distance i - j; |i - j| > R reads the saturated end columns (module docstring)."""
    batch, heads, length, width = band.shape
    # Edge padding to 2L columns, column u at distance L - 1 - u (radius <= L - 1: never negative amounts).
    rows = F.pad(band.reshape(batch * heads, length, width), (length - 1 - radius, length - radius), mode="replicate")
    flat = rows.reshape(batch, heads, 2 * length * length)
    window = flat[:, :, length - 1 : length - 1 + length * (2 * length - 1)]
    return window.reshape(batch, heads, length, 2 * length - 1)[..., :length]


def positional_bias(query_scaled, content_key, pos_key, pos_query, spec: RelativePositionSpec, softmax_scale):
    """c2p + p2c scores [B, H, L, L] (already scaled), or None when the spec has no positional term.

    query_scaled: s·Q [B, H, L, D]; content_key: K [B, H, L, D]; pos_key / pos_query: [1 or B, H, 2S, D].
    """
    radius = saturated_slot_table(spec)[0]
    length = query_scaled.shape[2]
    # Short sequences reach only distances up to L - 1 < R: the band shrinks to r = min(R, L - 1) on each side
    # (a negative constant pad crops). min(x, 0) stays symbolic as (x - |x|) / 2 in the TorchScript tracer (sizes are
    # traced tensors there) and as sym_min under torch.export.
    excess = length - 1 - radius
    crop = (excess - abs(excess)) // 2 if torch.jit.is_tracing() else torch.sym_min(excess, 0)
    reach = radius + crop

    def band(table, reverse):
        return F.pad(_band_rows(table, spec, reverse), (0, 0, crop, crop))

    bias = None
    if spec.c2p:
        # c2p(i, j) = s·Q_i · Pk[slot(i - j)]: query rows, distance i - j = r - k.
        bias = _toeplitz(torch.matmul(query_scaled, band(pos_key, True).transpose(-1, -2)), reach)
    if spec.p2c:
        # p2c(i, j) = s·K_j · Pq[slot(i - j)]: key rows j, distance i - j = -(r - k), transposed after placing.
        rows = band(pos_query, False) * softmax_scale
        p2c = _toeplitz(torch.matmul(content_key, rows.transpose(-1, -2)), reach).transpose(-1, -2)
        bias = p2c if bias is None else bias + p2c
    return bias


def disentangled_attention_export(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    spec: RelativePositionSpec | None,
    softmax_scale: float,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
    num_prefix_keys: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Disentangled attention for export. Arguments and semantics: ``deberta_fast.ops.attention``."""
    prefix = num_prefix_keys
    query_scaled = query * softmax_scale
    token_mask = attention_mask is not None and attention_mask.dim() == 2
    if token_mask:
        valid = attention_mask.to(torch.bool)
        lowest = torch.finfo(query.dtype).min
        # Masked keys get finfo.min through one more GEMM column: s·Q·Kᵀ + 1·bias_j in a single MatMul.
        key_bias = torch.zeros_like(valid, dtype=query.dtype).masked_fill(~valid, lowest)
        if prefix:
            key_bias = F.pad(key_bias, (prefix, 0))
        ones = torch.ones_like(query[..., :1])
        bias_column = key_bias[:, None, :, None].expand(-1, key.shape[1], -1, -1)
        scores = torch.matmul(torch.cat([query_scaled, ones], dim=-1), torch.cat([key, bias_column], dim=-1).transpose(-1, -2))
    else:
        scores = torch.matmul(query_scaled, key.transpose(-1, -2))
    if spec is not None and spec.any_position_term:
        bias = positional_bias(query_scaled, key[:, :, prefix:], pos_key, pos_query, spec, softmax_scale)
        scores = scores + (F.pad(bias, (prefix, 0)) if prefix else bias)
    if token_mask and prefix:
        # Prefix keys stay valid for a padded query; its content keys are all masked (no mean(V) rows then).
        content = scores[..., prefix:].masked_fill(~valid[:, None, :, None], lowest)
        scores = torch.cat([scores[..., :prefix], content], dim=-1)
    if attention_mask is not None and not token_mask:
        pair_ok = attention_mask.to(torch.bool)
        if prefix:
            pair_ok = F.pad(pair_ok, (prefix, 0), value=True)
        scores = scores.masked_fill(~pair_ok, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, value)
    if token_mask and not prefix:
        # transformers masks every pair of a padded query: its row is uniform over all keys, i.e. mean(V).
        uniform = value.mean(dim=-2, keepdim=True)
        out = torch.where(valid[:, None, :, None], out, uniform)
        if output_attentions:
            probs = torch.where(valid[:, None, :, None], probs, torch.full_like(probs[..., :1, :], 1.0) / probs.shape[-1])
    return out, (probs if output_attentions else None)
