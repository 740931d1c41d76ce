"""Relative-position slots against transformers' build_relative_position, and the reference op's memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from deberta_fast.ops import RelativePositionSpec, disentangled_attention_reference, distance_slot_table
from deberta_fast.ops.positions import slot_window

SPECS = {
    "v3": (256, 512),
    "small": (8, 24),
    "knee": (16, 64),
    "unbucketed": (-1, 48),
}


@pytest.mark.parametrize("length", [1, 2, 63, 300, 600])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_slot_table_matches_transformers(spec_name, length):
    buckets, max_rel = SPECS[spec_name]
    spec = RelativePositionSpec(c2p=True, p2c=True, position_buckets=buckets, max_relative_positions=max_rel)
    probe = torch.zeros(1, length, 1)
    relative = hf.build_relative_position(probe, probe, bucket_size=buckets, max_position=max_rel)[0]
    expected_c2p = torch.clamp(relative + spec.att_span, 0, spec.num_slots - 1)
    table = distance_slot_table(length, spec)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    assert torch.equal(table[i - j + length - 1], expected_c2p)  # exact: integer slots
    # p2c: transformers gathers at clamp(-relative(j, i) + S): the same slot of i - j.
    expected_p2c = torch.clamp(-relative + spec.att_span, 0, spec.num_slots - 1).T
    assert torch.equal(table[i - j + length - 1], expected_p2c)
    lo, hi = slot_window(length, spec)
    assert lo <= int(table.min()) and int(table.max()) <= hi


def test_v3_knee_and_saturation():
    """Buckets 256 / max 512: identity up to |d| = 128, slot 511 from d = 506, slot 0 from d = -512."""
    spec = RelativePositionSpec(c2p=True, p2c=True, position_buckets=256, max_relative_positions=512)
    table = distance_slot_table(600, spec)
    slot = lambda d: int(table[d + 599])  # noqa: E731
    assert [slot(d) for d in (0, 1, -1, 128, -128)] == [256, 257, 255, 384, 128]
    assert slot(505) < 511 and slot(506) == 511 and slot(599) == 511
    assert slot(-511) >= 0 and slot(-512) == 0 and slot(-599) == 0
    assert torch.all(table[1:] >= table[:-1])


class _RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.int64_numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64:
                self.int64_numels.append(tensor.untyped_storage().nbytes() // 8)
        return out


def test_reference_builds_no_quadratic_index_tensors():
    """transformers builds [1, L, L] int64 relative positions; the reference only an O(L) slot table."""
    length = 200
    spec = RelativePositionSpec(c2p=True, p2c=True, position_buckets=16, max_relative_positions=64)
    q = torch.randn(1, 2, length, 8)
    table = torch.randn(1, 2, spec.num_slots, 8)
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, 150:] = 0
    with _RecordAllocations() as recorder:
        disentangled_attention_reference(q, q, q, table, table, mask, spec, 0.2)
    assert recorder.int64_numels, "the recorder saw no int64 tensor at all"
    assert max(recorder.int64_numels) < 4 * length
