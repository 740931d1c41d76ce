"""Relative-position slots of DeBERTa-v2 disentangled attention.

For a query at position i and a key at position j the positional tables are read at

    slot(i - j) = clamp(bucket(i - j) + S, 0, 2S - 1),        S = att_span

where ``bucket`` is the identity (unbucketed) or transformers' log bucketing. The same slot serves both
terms: c2p(i, j) = Q_i · Pk[slot(i - j)] and p2c(i, j) = K_j · Pq[slot(i - j)], because the bucketing is
odd-symmetric (transformers gathers p2c at -bucket(j - i), which is the same slot).

slot(d) is monotone non-decreasing in d, so a set of distances maps onto one contiguous window of slots.
Everything here is O(L): a table indexed by the distance d + L - 1, never an [L, L] tensor.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RelativePositionSpec:
    """What the positional part of the attention needs to know.

    ``max_relative_positions`` is the resolved value (transformers replaces values < 1 by
    ``max_position_embeddings``). ``position_buckets <= 0`` means no bucketing.
    """

    c2p: bool
    p2c: bool
    position_buckets: int
    max_relative_positions: int

    def __post_init__(self):
        if self.max_relative_positions < 1:
            raise ValueError(
                f"max_relative_positions must be >= 1 once resolved, got {self.max_relative_positions}"
            )
        if self.bucketed:
            mid = self.position_buckets // 2
            # The log bucketing divides by log((max_position - 1) / mid): it needs max_position - 1 > mid.
            if self.max_relative_positions - 1 <= mid:
                raise ValueError(
                    "position_buckets and max_relative_positions are incompatible: the log bucketing needs "
                    f"max_relative_positions - 1 > position_buckets // 2, got max_relative_positions="
                    f"{self.max_relative_positions}, position_buckets={self.position_buckets}"
                )

    @property
    def bucketed(self) -> bool:
        return self.position_buckets > 0

    @property
    def att_span(self) -> int:
        """S: half the number of rows of the relative-embedding table that attention reads."""
        return self.position_buckets if self.bucketed else self.max_relative_positions

    @property
    def num_slots(self) -> int:
        return 2 * self.att_span

    @property
    def any_position_term(self) -> bool:
        return self.c2p or self.p2c


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """transformers' ``make_log_bucket_position``, written with the same tensor operations in the same
    order so that it rounds identically on every device (float32 by default).

    relative_pos: integer tensor of distances d. Returns a float tensor:
        d                                                             if |d| <= mid
        sign(d) * (ceil(log(|d| / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid)   otherwise
    with mid = bucket_size // 2 (distances with |d| < mid use mid - 1 inside the log, which is discarded).
    """
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    inside = (relative_pos < mid) & (relative_pos > -mid)
    abs_pos = torch.where(inside, torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    log_pos = (
        torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    )
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def slots_of_distances(distances: torch.Tensor, spec: RelativePositionSpec) -> torch.Tensor:
    """slot(d) for an int64 tensor of distances d = i - j (any shape), as int64 on the same device."""
    rel = distances
    if spec.bucketed:
        rel = log_bucket_position(distances, spec.position_buckets, spec.max_relative_positions)
    rel = rel.to(torch.long)
    return torch.clamp(rel + spec.att_span, 0, spec.num_slots - 1)


def distance_slot_table(length: int, spec: RelativePositionSpec, device=None) -> torch.Tensor:
    """int64 [2 * length - 1]: entry t is slot(t - (length - 1)), i.e. the slot of distance d at d + length - 1.

    While torch.compile / torch.export trace it, the table is gathered with integer ops from a constant table of
    the distances up to saturation (``saturated_slots``): the graph never evaluates the float32 log, whose last-bit
    rounding in generated code could move a slot at a bucket edge, and ``length`` may be symbolic.
    """
    distances = torch.arange(-(length - 1), length, dtype=torch.long, device=device)
    if torch.compiler.is_compiling():
        reach = saturation_distance(spec)
        return saturated_slots(spec).to(distances.device)[distances.clamp(-reach, reach) + reach]
    return slots_of_distances(distances, spec)


@torch.compiler.assume_constant_result
def saturation_distance(spec: RelativePositionSpec) -> int:
    """D: the smallest distance with slot(-D) = 0 and slot(D) = 2S - 1; every longer distance has those slots."""
    return _saturated(spec)[0]


@torch.compiler.assume_constant_result
def saturated_slots(spec: RelativePositionSpec) -> torch.Tensor:
    """int64 [2D + 1] (CPU): slot(d) for d = -D .. D, D = ``saturation_distance(spec)``."""
    return _saturated(spec)[1]


@contextlib.contextmanager
def host_constants():
    """Real CPU tensors inside, even while torch.export traces the caller with fake tensors: for constants of a
    graph computed from Python values only (the same torch ops, so the same rounding, as eager mode)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.inference_mode(False):
        yield


@functools.lru_cache(maxsize=64)
def _saturated(spec: RelativePositionSpec) -> tuple[int, torch.Tensor]:
    # slot(d) is monotone in d and saturates; the log buckets reach the ends near |d| = max_relative_positions.
    reach = max(spec.att_span, spec.max_relative_positions, 1)
    with host_constants():
        while True:
            distances = torch.arange(-reach, reach + 1, dtype=torch.long)
            table = slots_of_distances(distances, spec)
            if int(table[0]) == 0 and int(table[-1]) == spec.num_slots - 1:
                break
            reach *= 2
        # The smallest such reach: trim the saturated ends down to one entry each.
        low = int((table == 0).sum()) - 1
        high = int((table == spec.num_slots - 1).sum()) - 1
        trim = min(low, high)
        return reach - trim, table[trim : table.numel() - trim].clone()


def slot_window(length: int, spec: RelativePositionSpec) -> tuple[int, int]:
    """[lo, hi] (inclusive) of the slots that distances |d| <= length - 1 can reach, from host arithmetic.

    Evaluated on the CPU with the same float32 formula and widened by one slot on each side, so that a one-ULP
    difference of ``log`` on another device (the |d| = max_position - 1 knee) can never fall outside it.
    Computing it on the host keeps the reference free of device-to-host synchronisation; torch.compile evaluates it
    while tracing (a constant of the graph).
    """
    if isinstance(length, torch.SymInt):
        return 0, spec.num_slots - 1  # a symbolic length (torch.export with dynamic shapes): every slot
    return _slot_window(length, spec)


@torch.compiler.assume_constant_result
def _slot_window(length: int, spec: RelativePositionSpec) -> tuple[int, int]:
    with host_constants():
        ends = slots_of_distances(torch.tensor([-(length - 1), length - 1], dtype=torch.long), spec).tolist()
    return max(ends[0] - 1, 0), min(ends[1] + 1, spec.num_slots - 1)


def scale_factor(pos_att_type) -> int:
    """1 + number of positional terms: transformers counts c2p and p2c whether or not relative attention is on."""
    return 1 + int("c2p" in pos_att_type) + int("p2c" in pos_att_type)


def softmax_scale(head_dim: int, factor: int) -> float:
    """1 / sqrt(d · factor); the sqrt is taken in float32 as transformers takes it."""
    return 1.0 / float(np.sqrt(np.float32(head_dim) * np.float32(factor)))

