"""Adapters on both attention backends, and the adapter math going through deberta_fast.ops (dispatch)."""

from __future__ import annotations

import os

import pytest
import torch

from adapters_helpers import FIXTURES, TOLERANCE, expected, fixture_inputs, fixture_model, needs_fixtures, tiny_model
from deberta_fast import set_attention_backend
from deberta_fast.adapters import AdapterSetup
from deberta_fast.ops import BackendUnavailable, use_backend


@pytest.mark.parametrize("config,module_path,op_name", [
    ("lora", "encoder.layer.0.attention.self.query_proj", "lora"),
    ("ia3", "encoder.layer.1.intermediate.dense", "ia3"),
    ("seq_bn", "encoder.layer.0.output", "bottleneck"),
    ("par_bn[non_linearity='swish']", "encoder.layer.1.output", "bottleneck"),
])
def test_single_adapter_math_dispatches_through_ops(config, module_path, op_name, monkeypatch):
    """The module's adapter math runs through the op's dispatcher (so a fused backend plugs in there)."""
    import importlib

    op_module = importlib.import_module(f"deberta_fast.ops.{op_name}")
    calls = []
    original = op_module._RUN["reference"]
    monkeypatch.setitem(op_module._RUN, "reference", lambda *call: calls.append(1) or original(*call))
    model = tiny_model("v3")
    model.add_adapter("x", config=config)
    module = model.deberta.get_submodule(module_path)
    args = (torch.randn(1, 3, module.in_features),) if hasattr(module, "in_features") else (
        torch.randn(1, 3, module.dense.in_features), torch.randn(1, 3, model.config.hidden_size))
    with torch.no_grad(), AdapterSetup("x"), use_backend("reference"):
        module(*args)
    assert calls, f"the {config} module did not call deberta_fast.ops.{op_name}"
    calls.clear()
    with torch.no_grad(), use_backend("reference"):
        module(*args)  # no adapter active: plain linear / LayerNorm, no adapter op involved
    assert not calls


def test_gated_lora_runs_eagerly():
    model = tiny_model("v3")
    model.add_adapter("g", config="lora[use_gating=True]")
    linear = model.deberta.encoder.layer[0].attention.self.value_proj
    with torch.no_grad(), AdapterSetup("g"), use_backend("triton"):
        linear(torch.randn(1, 3, linear.in_features))


@needs_fixtures
def test_adapters_with_triton_attention_under_the_interpreter():
    """stack_lora_bn with the attention on the triton backend (interpreter on CPU); one row keeps B·H at 4."""
    model = fixture_model()
    for name in ("lora", "bn"):
        model.load_adapter(os.path.join(FIXTURES, "stack_lora_bn", f"adapter_{name}"), with_head=False)
    from deberta_fast.adapters import Stack

    model.set_active_adapters(Stack("lora", "bn"))
    set_attention_backend(model.deberta, "triton")
    inputs = {k: v[:1] for k, v in fixture_inputs().items()}
    try:
        with torch.no_grad():
            out = model(**inputs).last_hidden_state
    except BackendUnavailable as error:
        pytest.skip(f"the triton attention backend cannot run this call here: {error}")
    reference = expected("stack_lora_bn")["last_hidden_state"][:1]
    assert float((out - reference).abs().max()) <= TOLERANCE
