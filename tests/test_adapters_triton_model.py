"""The whole adapter model on the triton backend (kernels under the interpreter) against the reference backend.

Attention, the q/k/v projections with their LoRAs (one lora_qkv op), the FFN LoRAs, (IA)³ and the bottleneck
adapter all run their Triton kernels; outputs and every trainable gradient must match the reference backend.
"""

from __future__ import annotations

import pytest
import torch

from adapters_helpers import tiny_inputs, tiny_model
from deberta_fast.ops import lora_qkv as lora_qkv_module
from deberta_fast.ops import use_backend

SETUPS = {
    "lora_qkv_ffn_seq_bn": ("lora[r=4, attn_matrices=['q','k','v'], intermediate_lora=True, output_lora=True]",
                            "seq_bn[reduction_factor=4]"),
    "lora_qv_ia3": ("lora[r=8]", "ia3"),
}


def _run(model, inputs, backend):
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        out = model(**inputs).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_adapter_model_triton_matches_reference(setup, monkeypatch):
    first, second = SETUPS[setup]
    model = tiny_model("v3")
    model.add_adapter("a", config=first)
    model.add_adapter("b", config=second)
    from deberta_fast.adapters import Stack

    model.train_adapter(Stack("a", "b"))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # LoRA B starts at zero: give every adapter an effect
        for name, param in model.named_parameters():
            if ".loras." in name or ".adapters." in name:
                param.add_(torch.randn_like(param) * 0.1)
    calls = []
    original = lora_qkv_module._RUN["triton"]
    monkeypatch.setitem(lora_qkv_module._RUN, "triton", lambda *call: calls.append(1) or original(*call))
    inputs = {k: v[:1] for k, v in tiny_inputs(batch=2, length=20).items()}  # B·H = 4 under the interpreter
    expected, expected_grads = _run(model, inputs, "reference")
    got, got_grads = _run(model, inputs, "triton")
    assert (expected - got).abs().max().item() <= 1e-4
    assert expected_grads.keys() == got_grads.keys() and len(expected_grads) > 4
    for name, grad in expected_grads.items():
        error = (grad - got_grads[name]).norm() / grad.norm().clamp_min(1e-6)
        assert error <= 1e-4, f"{name}: relative gradient error {error:.2e}"
    if setup.startswith("lora_qkv"):
        assert calls, "the q/k/v projections did not run as one lora_qkv op"
