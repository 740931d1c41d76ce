"""pytest-benchmark cases for the full-model forward (run: pytest bench/ --benchmark-only).

Same models and inputs as bench_model.py; shapes kept small so that the suite finishes in minutes on a CPU.
Set DEBERTA_FAST_BENCH_SHAPES="512:12,2048:2" for the issue's full shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

from deberta_fast.benchmark import model as bench_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = bench_model.parse_shapes(os.environ.get("DEBERTA_FAST_BENCH_SHAPES", "256:2,512:2"))


@pytest.mark.parametrize("provider", bench_model.available_providers(DEVICE))
@pytest.mark.parametrize("length,layers", SHAPES, ids=[f"L{l}x{n}" for l, n in SHAPES])
def test_model_forward(benchmark, provider, length, layers):
    model = bench_model.build_model(provider, layers, DEVICE, torch.float32)
    run = bench_model.forward_fn(model, bench_model.make_inputs(length, 1, DEVICE))
    benchmark.group = f"model_forward L={length} layers={layers}"
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert out.shape == (1, length, 768)
