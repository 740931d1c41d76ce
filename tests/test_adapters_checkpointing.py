"""Gradient checkpointing with adapters that read the per-forward context (prefix tuning, prompt tuning, UniPELT,
ReFT, LoRA): the recomputed layers see the forward pass's context, so gradients equal those without
checkpointing."""

from __future__ import annotations

import pytest
import torch

from adapters_helpers import tiny_inputs, tiny_model

CONFIGS = {
    "prefix": "prefix_tuning[prefix_length=3]",
    "prefix_flat": "prefix_tuning[prefix_length=2, flat=True]",
    "prompt": "prompt_tuning[prompt_length=3]",
    "unipelt": "unipelt",
    "loreft": "loreft[prefix_positions=2, dropout=0.0]",
    "lora": "lora[r=2]",
}


def _grads(config: str, checkpointing: bool, reentrant: bool = False) -> dict:
    model = tiny_model()
    model.add_adapter("a", config=config)
    model.add_classification_head("a")
    model.train_adapter("a")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    out = model(**tiny_inputs(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_checkpointed_gradients_equal_plain_gradients(method):
    plain = _grads(CONFIGS[method], checkpointing=False)
    checkpointed = _grads(CONFIGS[method], checkpointing=True)
    assert set(plain) == set(checkpointed)
    assert any(".a." in name for name in plain)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_reentrant_checkpointing_runs_prompt_tuning():
    plain = _grads(CONFIGS["prompt"], checkpointing=False)
    checkpointed = _grads(CONFIGS["prompt"], checkpointing=True, reentrant=True)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_reentrant_checkpointing_refuses_prefix_tuning():
    with pytest.raises(ValueError, match="use_reentrant"):
        _grads(CONFIGS["prefix"], checkpointing=True, reentrant=True)
