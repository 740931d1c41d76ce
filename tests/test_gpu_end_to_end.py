"""End to end on CUDA with backend ``auto`` (what a user gets): deberta_fast's model classes against transformers'
on the same GPU, forward and backward, fp32 and bf16, and an adapter model training step.

Marked ``gpu``: skipped without a CUDA device (tests/conftest.py); the prepared GPU check runs them.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from adapters_helpers import tiny_inputs, tiny_model
from configs import make_config, make_mask, transformers_and_fast
from deberta_fast.ops import use_backend

pytestmark = pytest.mark.gpu

CONFIGS = ("v3", "c2p_only", "p2c_only", "unbucketed", "odd_head_dim")


def _inputs(config, batch=3, length=150, mask="right"):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator)
    inputs = {"input_ids": input_ids.cuda()}
    attention_mask = make_mask(mask, batch, length)
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.cuda()
    return inputs


@pytest.mark.parametrize("config_name", CONFIGS)
def test_model_fp32_on_cuda_matches_transformers(config_name):
    """auto picks the compiled Triton kernels on CUDA; true fp32 (torch's default "highest" matmul precision, so no
    TF32 in either model) stays within 1e-4 of transformers."""
    config = make_config(config_name)
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    reference, fast = reference.cuda(), fast.cuda()
    inputs = _inputs(config)
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
        with use_backend("auto"):
            got = fast(**inputs).last_hidden_state
    valid = inputs["attention_mask"].bool()
    assert (expected - got)[valid].abs().max().item() <= 1e-4


@pytest.mark.parametrize("config_name", ("v3", "small_buckets"))
def test_model_gradients_on_cuda_match_transformers(config_name):
    config = make_config(config_name)
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    reference, fast = reference.cuda(), fast.cuda()
    inputs = _inputs(config, length=70)
    weights = torch.linspace(-1, 1, config.hidden_size, device="cuda")
    (reference(**inputs).last_hidden_state * weights).sum().backward()
    with use_backend("auto"):
        (fast(**inputs).last_hidden_state * weights).sum().backward()
    expected = dict(reference.named_parameters())
    checked = 0
    for name, param in fast.named_parameters():
        if param.grad is None or name not in expected or expected[name].grad is None:
            continue
        want = expected[name].grad
        error = (param.grad - want).norm() / want.norm().clamp_min(1e-6)
        assert error <= 1e-3, f"{name}: relative gradient error {error:.2e}"
        checked += 1
    assert checked > 10


def test_model_bf16_on_cuda_within_budget():
    """bf16 model output against an fp32 oracle: at most 2x the error of transformers in bf16, plus a floor."""
    config = make_config("v3")
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    reference, fast = reference.cuda(), fast.cuda()
    inputs = _inputs(config, length=300)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        oracle = reference(**inputs).last_hidden_state
        ref_bf16 = reference.to(torch.bfloat16)(**inputs).last_hidden_state.float()
        with use_backend("auto"):
            got = fast.to(torch.bfloat16)(**inputs).last_hidden_state.float()
    ref_error = (ref_bf16 - oracle)[valid].abs().max().item()
    error = (got - oracle)[valid].abs().max().item()
    assert error <= 2 * ref_error + 1e-2, f"bf16 error {error:.3e} vs transformers bf16 {ref_error:.3e}"


def test_adapter_model_training_step_on_cuda():
    """LoRA on q/k/v plus a bottleneck adapter: auto (Triton on CUDA) and the reference give the same loss and
    adapter gradients."""
    model = tiny_model("v3").cuda()
    model.add_adapter("a", config="lora[r=8, attn_matrices=['q','k','v']]")
    model.add_adapter("b", config="seq_bn[reduction_factor=4]")
    from deberta_fast.adapters import Stack

    model.train_adapter(Stack("a", "b"))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".loras." in name or ".adapters." in name:
                param.add_(torch.randn_like(param) * 0.1)
    inputs = {k: v.cuda() for k, v in tiny_inputs(batch=2, length=40).items()}

    def step(backend):
        model.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = model(**inputs).last_hidden_state
            (out * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, expected_grads = step("reference")
    got, got_grads = step("auto")
    assert (expected - got).abs().max().item() <= 1e-3
    assert expected_grads.keys() == got_grads.keys() and len(expected_grads) > 4
    for name, grad in expected_grads.items():
        error = (grad - got_grads[name]).norm() / grad.norm().clamp_min(1e-6)
        assert error <= 1e-3, f"{name}: relative gradient error {error:.2e}"
