"""Disentangled attention in plain tensor ops that both ONNX exporters lower to standard ONNX ops.

``deberta_fast.ops.attention`` routes here while ``torch.onnx.export`` traces a model (TorchScript exporter or
dynamo exporter), before any backend dispatch: the custom ops of the native and Triton backends have no ONNX
translation, and dispatch decides from values the exporters cannot see. Same contract and semantics as
``attention.py`` (transformers 5.24's DisentangledSelfAttention); the graph stays valid for any B and L.

O(L) position handling: no [L, L] index tensor (transformers' export builds one, expanded to [B·H, L, L] int64).

- Slots. slot(d) is constant for |d| >= R (the saturation radius of the spec: the clamp to [0, 2S - 1] or a
  constant log bucket; R = 512 for 256 buckets and max_relative_positions 512), so the host computes
  ``table[k] = slot(k - R)`` once per spec, k = 0 .. 2R, with the same torch float32 formula as every backend. With
  r = min(R, L - 1), the graph reads the 2r + 1 rows of the [B, H, 2S, L] products s·Pk·Qᵀ and s·Pq·Kᵀ at those
  slots (a Gather of whole rows with a constant index of length 2r + 1: nothing is indexed per pair).
- Far constants in the score GEMM. For i - j > R (lower far) c2p + p2c = a_i + b_j with a_i = s·Q_i·Pk[slot(R)],
  b_j = s·K_j·Pq[slot(R)]; both are exact rank-one terms of the content GEMM: K_j + Pk[slot(R)] replaces K_j, and b_j
  joins the key-mask bias column. Everything else is relative to them: T = c2p + p2c - a_i - b_j is 0 in the lower
  far region, exactly (``triu`` with diagonal -R zeroes it), and u_i + v_j in the upper far region (j - i > R),
  u_i = a'_i - a_i and v_j = b'_j - b_j for the primed constants at slot(-R).
- One band for both terms, in query rows. Z[i, k] at distance d = r - k (k = 0 .. 2r):
  c2p part s·Q_i·(Pk[slot(d)] - Pk[slot(R)]) straight from the GEMM rows; p2c part s·K_{i-d}·(Pq[slot(d)] -
  Pq[slot(-R)]), a row of the distance-major product E = s·(Pq - Pq[slot(-R)])·Kᵀ shifted by d: E's [2r + 1, L]
  rows, gathered in decreasing d like c2p's, are read as a flat buffer with row stride L + 1 from r elements
  before their start (one constant Pad of r in front and r + 1 behind makes the length (2r + 1)(L + 1), then a
  Reshape), which shifts row k by k - r: O(L·r), never [L, L], and no row flip. The shifted rows have L + 1
  columns (the last one and the cells that read a neighbouring row belong to invalid keys and are never read);
  c2p's GEMM gets one zero query more to match. One transpose of the [2r + 1, L + 1] band; no [L, L] transpose
  (in an ORT profile at L=2048 the [L, L] p2c transpose is the costliest non-GEMM op of transformers' export).
- Placement on the diagonals ("skew"). Z edge-padded to W = L + r + 2 columns (the upper far cells read Z's last
  column, d = -r: u_i when r = R, since that p2c part is relative to slot(-R)) and to W - 1 rows; the flat buffer
  then reshapes to [W, W - 1], and T[i, j] = flat[r + i·(W - 1) + j] = view[i, r + j] for every j >= i - r, so
  T = view[:L, r : r + L] (one Pad with negative pads on both axes: a single copy; the rows past L only make the
  reshape possible and are never read). The rest (lower far) reads the previous row's edge padding and is zeroed
  by ``triu``. Adding v_j (a [B, H, 1, L] broadcast) before ``triu`` completes the upper far region.
  The v_j term is why a triangle op is needed at all: p2c's far constants depend on the key, and the two far regions
  differ by v_j, which no edge padding of query rows can produce. W = L + r + 2 rather than the L + 1 of a
  wrap-around skew: with L + 1 the top-right corner would read the invalid-key cells of the next row's band, and
  for R < L < 2R the band would not fit.

The key-padding mask enters the content score through the same extra GEMM column as b_j (a 1 in every query, the
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


def _symbolic_min0(value):
    """min(value, 0) that stays symbolic: (x - |x|) / 2 in the TorchScript tracer (sizes are traced tensors there),
    sym_min under torch.export."""
    return (value - abs(value)) // 2 if torch.jit.is_tracing() else torch.sym_min(value, 0)


def positional_terms(query_scaled, content_key, pos_key, pos_query, spec: RelativePositionSpec, softmax_scale):
    """The positional part of the scores, split as in the module docstring.

    query_scaled: s·Q [B, H, L, D]; content_key: K [B, H, L, D]; pos_key / pos_query: [1 or B, H, 2S, D].
    Returns (key_offset [1 or B, H, 1, D] or None, key_bias [B, H, L] or None, relative [B, H, L, L]) with
    c2p + p2c = s·Q·key_offsetᵀ (broadcast over keys) + key_bias_j + relative.
    """
    radius, slots = saturated_slot_table(spec)
    batch, heads, length, _ = query_scaled.shape
    # Short sequences reach only distances up to L - 1 < R: the band shrinks to r = min(R, L - 1) on each side (a
    # negative constant pad crops the constant slot index).
    crop = _symbolic_min0(length - 1 - radius)
    reach = radius + crop
    index = torch.tensor(slots, dtype=torch.long, device=query_scaled.device)
    lower, upper = index[-1:], index[:1]  # slot(R), slot(-R)
    band_index = F.pad(index, (crop, crop))  # slot(d) for d = -r .. r

    key_offset = key_bias = distance_major = None
    descending = band_index.flip(0)  # slot(d) for d = r .. -r: the band's column order below
    if spec.c2p:
        key_offset = torch.index_select(pos_key, 2, lower)
        # One zero query more: the band has L + 1 query columns, like p2c's shifted rows below.
        padded_query = F.pad(query_scaled, (0, 0, 0, 1))
        products = torch.matmul(pos_key - key_offset, padded_query.transpose(-1, -2))  # [B, H, 2S, L + 1]
        distance_major = torch.index_select(products, 2, descending)
    if spec.p2c:
        table = pos_query * softmax_scale
        far = torch.index_select(table, 2, torch.cat([lower, upper]))  # rows slot(R), slot(-R)
        products = torch.matmul(table - far[:, :, 1:], content_key.transpose(-1, -2))  # [B, H, 2S, L], column j
        rows = torch.index_select(products, 2, descending)  # row k: d = r - k, needs key i - r + k
        width = rows.shape[2]
        # Read with row stride L + 1 from r before the start: row k shifts by k - r. The flat pad makes the
        # length (2r + 1)(L + 1); cells reading outside their own row belong to invalid keys, never read.
        flat = F.pad(rows.reshape(batch, heads, width * length), (reach, reach + 1))
        shifted = flat.reshape(batch, heads, width, length + 1)
        distance_major = shifted if distance_major is None else distance_major + shifted
        constants = torch.matmul(content_key, torch.cat([far[:, :, :1], far[:, :, 1:] - far[:, :, :1]], 2).transpose(-1, -2))
        key_bias, upper_bias = constants[..., 0], constants[..., 1]  # b_j and v_j, [B, H, L]
    band = distance_major.transpose(-1, -2).reshape(batch * heads, length + 1, 2 * reach + 1)  # query L: unused
    # Skew: edge-padded to W = L + r + 2 columns and W - 1 rows, so that the flat buffer reshapes to [W, W - 1]
    # (the rows past L are never read). Row i of T starts at flat r + i·(W - 1): T = view[:L, r : r + L], cropped
    # by one Pad with negative pads (a single ONNX node; two Slices would copy twice).
    width = length + reach + 2
    buffer = F.pad(band, (0, length - reach + 1, 0, reach), mode="replicate").reshape(batch, heads, width, width - 1)
    relative = F.pad(buffer, (-reach, -1, 0, length - width))
    if spec.p2c:
        relative = relative + upper_bias[:, :, None, :]
    return key_offset, key_bias, torch.triu(relative, diagonal=-radius)


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
    content_key = key[:, :, prefix:]
    key_offset = column = relative = None
    if spec is not None and spec.any_position_term:
        key_offset, column, relative = positional_terms(
            query_scaled, content_key, pos_key, pos_query, spec, softmax_scale
        )
    if token_mask:
        valid = attention_mask.to(torch.bool)
        lowest = torch.finfo(query.dtype).min
        mask_bias = torch.zeros_like(valid, dtype=query.dtype).masked_fill(~valid, lowest)[:, None, :]
        column = mask_bias if column is None else column + mask_bias
    if key_offset is not None:
        # a_i = s·Q_i·Pk[slot(R)] for every content key: s·Q_i·(K_j + Pk[slot(R)]).
        shifted = content_key + key_offset
        key = torch.cat([key[:, :, :prefix], shifted], dim=2) if prefix else shifted
    if column is not None:
        # Per-key terms (mask bias, b_j) through one more GEMM column: [s·Q, 1]·[K, bias]ᵀ in a single MatMul.
        column = column.expand(query.shape[0], key.shape[1], -1)
        if prefix:
            column = F.pad(column, (prefix, 0))
        ones = torch.ones_like(query[..., :1])
        scores = torch.matmul(torch.cat([query_scaled, ones], dim=-1), torch.cat([key, column[..., None]], dim=-1).transpose(-1, -2))
    else:
        scores = torch.matmul(query_scaled, key.transpose(-1, -2))
    if relative is not None:
        scores = scores + (F.pad(relative, (prefix, 0)) if prefix else relative)
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
