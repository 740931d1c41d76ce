"""pytest-benchmark cases of the suite's op-level cases (run: pytest bench/ --benchmark-only).

Attention layer (projections + attention) per backend, full model forward+backward, LoRA linear and bottleneck
adapter per backend, on small shapes so that the module runs in a few minutes on a CPU; on CUDA the triton
backends join. The suite (``deberta-fast bench``) measures the same cases at the issue's shapes.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from deberta_fast.benchmark import model as model_bench
from deberta_fast.models import fast_attention_from
from deberta_fast.ops import attention as attention_op
from deberta_fast.ops import bottleneck as bottleneck_op
from deberta_fast.ops import lora as lora_op
from deberta_fast.ops import use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends(candidates):
    return [c.name for c in candidates if c.device_type in (None, DEVICE)]


@pytest.mark.parametrize("provider", ["transformers"] + _backends(attention_op.CANDIDATES))
@pytest.mark.parametrize("length", [256, 512])
def test_attention_layer_forward(benchmark, provider, length):
    config = hf.DebertaV2Config(**model_bench.V3_BASE, num_hidden_layers=1, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    module = hf.DisentangledSelfAttention(config).to(DEVICE).eval()
    rel = torch.randn(2 * config.position_buckets, config.hidden_size, device=DEVICE)
    hidden = torch.randn(1, length, config.hidden_size, device=DEVICE)
    if provider == "transformers":
        mask = torch.ones(1, 1, length, length, device=DEVICE)
    else:
        module = fast_attention_from(module)
        module.backend = provider
        mask = torch.ones(1, length, device=DEVICE)
    benchmark.group = f"attention layer L={length}"
    with torch.no_grad():
        out = benchmark.pedantic(lambda: module(hidden, mask, rel_embeddings=rel)[0], rounds=5, warmup_rounds=1)
    assert out.shape == (1, length, config.hidden_size)


@pytest.mark.parametrize("provider", model_bench.available_providers(DEVICE))
def test_model_forward_backward(benchmark, provider):
    model = model_bench.build_model(provider, 2, DEVICE, torch.float32)
    inputs = model_bench.make_inputs(256, 1, DEVICE)

    def step():
        model(**inputs).last_hidden_state.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    benchmark.group = "model forward+backward L=256 layers=2"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", _backends(lora_op.CANDIDATES))
def test_lora_linear_forward_backward(benchmark, backend):
    torch.manual_seed(0)
    x = torch.randn(2048, 768, device=DEVICE, requires_grad=True)
    weight, bias = torch.randn(768, 768, device=DEVICE) / 28, torch.randn(768, device=DEVICE)
    lora_A = torch.randn(16, 768, device=DEVICE, requires_grad=True)
    lora_B = torch.randn(768, 16, device=DEVICE, requires_grad=True)

    def step():
        with use_backend(backend):
            lora_op.lora_linear(x, weight, bias, lora_A, lora_B, 2.0).sum().backward()

    benchmark.group = "lora_linear 2048x768 r=16 fwd+bwd"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("backend", _backends(bottleneck_op.CANDIDATES))
def test_bottleneck_forward_backward(benchmark, backend):
    torch.manual_seed(0)
    x = torch.randn(2048, 768, device=DEVICE, requires_grad=True)
    params = [torch.randn(48, 768, device=DEVICE) / 28, torch.zeros(48, device=DEVICE),
              torch.randn(768, 48, device=DEVICE) / 7, torch.zeros(768, device=DEVICE)]
    for p in params:
        p.requires_grad_()

    def step():
        with use_backend(backend):
            bottleneck_op.bottleneck_adapter(x, *params, x, activation="relu").sum().backward()

    benchmark.group = "bottleneck 2048x768->48 fwd+bwd"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
