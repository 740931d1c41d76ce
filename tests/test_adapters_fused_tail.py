"""DebertaV2AdapterModel's output tails on the fused ops (adapters/injection.py, models/output_blocks.py).

Where no bottleneck adapter runs at an attention-output / FFN-output block, the block's tail runs on
``residual_layernorm``; where no adapter changes the intermediate dense, the GELU runs on ``bias_gelu``. The oracle
is the same model with a no-op forward hook on every tail block, which sends each block down its unfused path
(torch dropout + LayerNorm, the adapter library's composition, transformers' GELU): outputs and every gradient must
agree, in eval and in train mode with dropout 0. Counting the calls of the native ops (their dispatch table patched
for the test) shows which tails were fused.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from deberta_fast.adapters import Stack
from deberta_fast.ops import bias_gelu as bg
from deberta_fast.ops import residual_layernorm as rln
from deberta_fast.ops import use_backend

# adapter config -> (fused residual+LayerNorm tails per layer, fused GELUs per layer), read off AdapterHub's placement:
# seq_bn sits at the FFN output only, double_seq_bn at both outputs; lora defaults to q/v; ia3 scales k/v and the
# intermediate dense; the "lora_ffn" entry also puts LoRA on both FFN denses.
CASES = {
    "none": (None, 2, 1),
    "lora": ("lora[r=4, alpha=8]", 2, 1),
    "lora_ffn": ("lora[r=4, alpha=8, intermediate_lora=True, output_lora=True]", 2, 0),
    "ia3": ("ia3", 2, 0),
    "seq_bn": ("seq_bn[reduction_factor=4]", 1, 1),
    "double_seq_bn": ("double_seq_bn[reduction_factor=4]", 0, 1),
}
LAYERS = 2  # tests/configs.py BASE


pytestmark = pytest.mark.usefixtures("native_ops")


def _model(case: str):
    config, _, _ = CASES[case]
    model = tiny_model("v3")
    if config is not None:
        model.add_adapter("a", config=config)
        randomize_adapter_(model, "a")  # LoRA's B and the adapters' up-projections start at 0: make them count
        model.set_active_adapters("a")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _unfused(model):
    """A copy whose tail blocks each carry a no-op forward hook: the hook sends them down the unfused path."""
    other = copy.deepcopy(model)
    for layer in other.deberta.encoder.layer:
        for block in (layer.attention.output, layer.intermediate, layer.output):
            block.register_forward_hook(lambda module, args, output: None)
    return other


def _counting(monkeypatch):
    calls = {"residual_layernorm": 0, "bias_gelu": 0}
    for name, op in (("residual_layernorm", rln), ("bias_gelu", bg)):
        native = op._RUN["cpu"]

        def counted(*call, _name=name, _native=native):
            calls[_name] += 1
            return _native(*call)

        monkeypatch.setitem(op._RUN, "cpu", counted)
    return calls


def _run(model, inputs):
    out = model(**inputs)
    return out.last_hidden_state


def _assert_close(got, want, what, rtol):
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= rtol * scale, f"{what}: {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("mode", ("eval", "train_no_dropout"))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_tails_match_the_unfused_path_with_their_gradients(case, mode, monkeypatch):
    model = _model(case)
    reference = _unfused(model)
    for m in (model, reference):
        m.train(mode != "eval")
    inputs = tiny_inputs(batch=2, length=11)
    calls = _counting(monkeypatch)
    got = _run(model, inputs)
    _, rln_per_layer, gelu_per_layer = CASES[case]
    assert calls == {"residual_layernorm": rln_per_layer * LAYERS, "bias_gelu": gelu_per_layer * LAYERS}
    want = _run(reference, inputs)
    assert calls == {"residual_layernorm": rln_per_layer * LAYERS, "bias_gelu": gelu_per_layer * LAYERS}
    _assert_close(got, want, "last_hidden_state", 1e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mine = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad], grad, allow_unused=True)
    theirs = torch.autograd.grad(want, [p for p in reference.parameters() if p.requires_grad], grad,
                                 allow_unused=True)
    assert len(mine) == len(theirs) and len(names) == len(mine)
    compared = 0
    for name, a, b in zip(names, mine, theirs):
        assert (a is None) == (b is None), name
        if a is not None:
            _assert_close(a, b, name, 1e-4)
            compared += 1
    # the dense and LayerNorm parameters of every tail block got gradients through the fused ops
    assert compared > 0 and all(
        any(f"layer.{i}.{block}" in n for n in names) for i in range(LAYERS)
        for block in ("attention.output.LayerNorm.weight", "output.dense.bias", "intermediate.dense.bias"))


def test_bottleneck_at_one_output_keeps_the_other_fused_and_a_stack_decides_per_location(monkeypatch):
    """seq_bn (FFN output only) stacked after a LoRA on the FFN denses: the attention output stays fused, the FFN
    output runs the adapter path, the GELU runs transformers' (LoRA changes its dense)."""
    model = tiny_model("v3")
    model.add_adapter("l", config="lora[r=2, alpha=4, intermediate_lora=True, output_lora=True]")
    model.add_adapter("b", config="seq_bn[reduction_factor=4]")
    for name in ("l", "b"):
        randomize_adapter_(model, name)
    model.set_active_adapters(Stack("l", "b"))
    reference = _unfused(model)
    inputs = tiny_inputs()
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = _run(model, inputs)
        assert calls == {"residual_layernorm": LAYERS, "bias_gelu": 0}
        _assert_close(got, _run(reference, inputs), "last_hidden_state", 1e-5)


def test_merged_lora_on_the_ffn_denses_is_a_plain_linear_again(monkeypatch):
    model = _model("lora_ffn")
    reference = _unfused(model)
    model.merge_adapter("a")
    inputs = tiny_inputs()
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = _run(model, inputs)
        assert calls == {"residual_layernorm": 2 * LAYERS, "bias_gelu": LAYERS}
        _assert_close(got, _run(reference, inputs), "last_hidden_state", 1e-5)


def test_inactive_adapter_and_skipped_layers_take_the_fused_tail(monkeypatch):
    model = _model("double_seq_bn")
    inputs = tiny_inputs()
    calls = _counting(monkeypatch)
    with torch.no_grad():
        model.set_active_adapters(None)
        plain = _run(model, inputs)
        assert calls["residual_layernorm"] == 2 * LAYERS
        model.set_active_adapters("a")
        _run(model, inputs)
        assert calls["residual_layernorm"] == 2 * LAYERS  # the bottlenecks run at both outputs: nothing fused
        reference = _unfused(model)
        reference.set_active_adapters(None)
        _assert_close(plain, _run(reference, inputs), "no active adapter", 1e-5)


def test_reference_backend_and_a_hooked_dense(monkeypatch):
    """use_backend("reference") runs the fused tails' plain-op reference (one call per tail, no native call); a
    hooked dense runs as a module (its hook sees the output, bias included) and its tail stays on the fused op."""
    model = _model("none")
    calls = _counting(monkeypatch)
    seen = {"reference": 0}
    original = rln._RUN["reference"]
    monkeypatch.setitem(rln._RUN, "reference", lambda *call: seen.__setitem__("reference", seen["reference"] + 1)
                        or original(*call))
    inputs = tiny_inputs()
    with torch.no_grad():
        want = _run(_unfused(model), inputs)
        with use_backend("reference"):
            got = _run(model, inputs)
        assert seen["reference"] == 2 * LAYERS and calls["residual_layernorm"] == 0
        _assert_close(got, want, "reference backend", 1e-5)
        block = model.deberta.encoder.layer[0].attention.output
        outputs = []
        handle = block.dense.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            _run(model, inputs)
        finally:
            handle.remove()
        assert len(outputs) == 1 and calls["residual_layernorm"] == 2 * LAYERS


def test_train_mode_with_dropout_uses_the_native_stream_and_logs_no_skip(monkeypatch, caplog):
    """The default training setup (hidden dropout on, no adapter): every tail on the native op, no skip logged."""
    torch.manual_seed(0)
    model = tiny_model("v3", hidden_dropout_prob=0.1).train()
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.INFO, logger="deberta_fast"):
        out = _run(model, tiny_inputs())
        out.sum().backward()
    assert calls == {"residual_layernorm": 2 * LAYERS, "bias_gelu": LAYERS}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()
               and ("residual_layernorm" in r.getMessage() or "bias_gelu" in r.getMessage())]
    assert not skipped, skipped
    assert model.deberta.encoder.layer[0].output.dense.bias.grad is not None
