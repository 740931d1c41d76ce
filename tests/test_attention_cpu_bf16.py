"""bf16 inference on the native CPU op: a model cast to bf16, or run under torch.autocast("cpu", bf16), sends bf16
q / k / v and positional tables to the native op (fp32 tiles inside, bf16 out) and its linear layers run in bf16;
the error against float64 stays within the numerics policy's budget (DESIGN.md §5): at most twice the error of
plain PyTorch (transformers' eager model) in the same precision, plus a small floor, on the valid positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
import deberta_fast.ops.attention as attention_op
from deberta_fast.ops import attention_cpu

from configs import make_config, make_mask, transformers_and_fast

FLOOR = 2e-2  # bf16 has 8 bits of mantissa: a few units of its last place at the hidden states' magnitude


pytestmark = pytest.mark.usefixtures("native_ops")


@pytest.fixture
def native_dtypes(monkeypatch):
    """The dtypes of the queries that reached the native op."""
    seen = []
    run = attention_cpu.run

    def spy(*call):
        seen.append(call[0].dtype)
        return run(*call)

    monkeypatch.setitem(attention_op._RUN, "cpu", spy)
    return seen


def model_inputs(config, length, batch=3):
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, config.vocab_size, (batch, length), generator=generator),
        "attention_mask": make_mask("right", batch, length),
    }


@pytest.mark.parametrize("mode", ("cast", "autocast"))
@pytest.mark.parametrize("config_name,length", [("v3", 65), ("v3", 300), ("v2_xlarge", 129), ("c2p_only", 129)])
def test_bf16_model_runs_the_native_op_within_the_error_budget(config_name, length, mode, native_dtypes):
    config = make_config(config_name)
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    inputs = model_inputs(config, length)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        exact = reference.double()(**inputs).last_hidden_state
        reference.float()

        def error(model):
            if mode == "cast":
                model.to(torch.bfloat16)
                try:
                    out = model(**inputs).last_hidden_state
                    assert out.dtype == torch.bfloat16
                finally:
                    model.float()
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(**inputs).last_hidden_state
            return (out.double() - exact)[valid].abs().max().item()

        plain_error = error(reference)
        native_dtypes.clear()
        our_error = error(fast)
    assert native_dtypes and all(d == torch.bfloat16 for d in native_dtypes), native_dtypes
    assert our_error <= 2 * plain_error + FLOOR, f"{mode}: ours {our_error:.3g}, transformers {plain_error:.3g}"
