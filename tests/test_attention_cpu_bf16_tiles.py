"""bf16 tile products of the native op's forward pass (csrc/bf16_tiles.h).

On a CPU with bf16 dot products (AVX-512 BF16 or AMX) a bf16 call without dropout, with even head dim and prefix,
multiplies its tiles in bf16 with fp32 accumulation; other calls keep the fp32 tiles. Either way the products' inputs
are the tensors' own bf16 values (the softmax scale is applied to fp32 products), so:
- the saved log-sum-exp equals the one of the same values in fp32, up to the order of fp32 sums;
- the output differs from the fp32 call only by the rounding of the probabilities to bf16 (relative 2^-9 each, so at
  most 2^-9 max|V|) and of the result to bf16 (2^-9 |out|): at most 2^-8 max|V| in all.
"""

from __future__ import annotations

import os

import pytest
import torch

from deberta_fast.ops import attention_cpu

from configs import make_mask
from test_attention_cpu import make_call

CASES = [
    dict(spec_name="v3", length=300, mask_kind="holes"),
    dict(spec_name="v3", length=65, mask_kind="right", prefix=2),            # even prefix: bf16 tiles
    dict(spec_name="v3", length=65, mask_kind="right", prefix=3),            # odd prefix: fp32 tiles
    dict(spec_name="small_buckets", length=129, mask_kind="single", dim=13),  # odd head dim: fp32 tiles
    dict(spec_name="c2p_only", length=257, mask_kind="left", value_dim=24, strided=True),
    dict(spec_name="p2c_only", length=127, mask_kind="none", pos_batch=3, strided=True),
    dict(spec_name="unbucketed", length=1, mask_kind="none"),
    dict(spec_name="no_positions", length=64, mask_kind="holes", prefix=130),  # two prefix panels
]


pytestmark = pytest.mark.usefixtures("native_ops")


def raw_forward(tensors, mask, kwargs, pair_mask=None):
    query, key, value, pos_key, pos_query = tensors
    spec = kwargs["spec"]
    slots = attention_cpu._slot_table(query.shape[2], spec) if spec is not None else None
    return torch.ops.deberta_fast_cpu.disentangled_attention_forward(
        query, key, value, pos_key if spec is not None and spec.c2p else None,
        pos_query if spec is not None and spec.p2c else None, None if pair_mask is not None else mask, slots,
        kwargs["softmax_scale"], kwargs["num_prefix_keys"], pair_mask, None, 0.0)


def cpu_has_bf16_dot_products() -> bool:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        flags = set(handle.read().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_tile_products_are_used_where_the_cpu_has_them():
    expected = (torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.backends.mkldnn.is_available()
                and cpu_has_bf16_dot_products())
    assert torch.ops.deberta_fast_cpu.bf16_tile_products() == expected


@pytest.mark.parametrize("pair", (False, True), ids=("token_mask", "pair_mask"))
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
def test_bf16_forward_matches_the_fp32_tiles_on_the_same_values(case, pair):
    case = dict(case)
    tensors, mask, kwargs = make_call(case.pop("spec_name"), case.pop("length"), case.pop("mask_kind"),
                                      dtype=torch.bfloat16, **case)
    tensors = [t.detach() for t in tensors]
    pair_mask = None
    if pair:  # a per-head pair mask with holes, every row keeping its diagonal
        batch, heads, length = tensors[0].shape[:3]
        generator = torch.Generator().manual_seed(3)
        pair_mask = torch.rand(batch, heads, length, length, generator=generator) > 0.3
        pair_mask |= torch.eye(length, dtype=torch.bool)
    out16, lse16 = raw_forward(tensors, mask, kwargs, pair_mask)
    out32, lse32 = raw_forward([t.float() for t in tensors], mask, kwargs, pair_mask)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    finite = torch.isfinite(lse32)
    assert torch.equal(finite, torch.isfinite(lse16))
    torch.testing.assert_close(lse16[finite], lse32[finite], atol=2e-5, rtol=2e-6)
    bound = 2.0 ** -8 * tensors[2].float().abs().max().item() + 1e-6
    error = (out16.float() - out32).abs().max().item()
    assert error <= bound, f"output error {error} > 2^-8 max|V| = {bound}"


def test_bf16_forward_is_bitwise_identical_for_one_and_two_threads():
    tensors, mask, kwargs = make_call("v3", 300, "holes", prefix=2, pos_batch=3, dtype=torch.bfloat16)
    tensors = [t.detach() for t in tensors]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(raw_forward(tensors, mask, kwargs))
    finally:
        torch.set_num_threads(previous)
    # exact by design: every tile's products and sums run on one thread in a fixed order, whichever thread it is
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
