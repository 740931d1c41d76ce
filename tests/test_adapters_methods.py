"""The math of LoRA, (IA)³ and the bottleneck family, against formulas written out here.

Model-level oracles are transformers' own DebertaV2Model with the adapter folded into its weights (LoRA:
W + (alpha/r)·B A; (IA)³: W and b scaled), so the relative-position path (share_att_key) is covered by
transformers' code. Module-level oracles spell out AdapterHub's placements for every bottleneck option.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from deberta_fast.adapters import AdapterSetup, Average, LoRAConfig, SeqBnConfig, Stack

TOL = 1e-5


def _transformers_twin(model):
    twin = hf.DebertaV2Model(model.config).eval()
    state = {k[len("deberta."):]: v for k, v in model.state_dict().items()
             if k.startswith("deberta.") and ".loras." not in k and ".adapters." not in k}
    twin.load_state_dict(state, strict=True)
    return twin


def _targets(layer, config):
    names = []
    if config.selfattn_lora:
        names += [("attention.self", {"q": "query_proj", "k": "key_proj", "v": "value_proj"}[m])
                  for m in config.attn_matrices]
    if config.intermediate_lora:
        names.append(("intermediate", "dense"))
    if config.output_lora:
        names.append(("output", "dense"))
    return [(layer.get_submodule(parent), attr) for parent, attr in names]


@pytest.mark.parametrize("config_name", ["v3", "v2_xlarge"])
@pytest.mark.parametrize("lora", [
    LoRAConfig(),
    LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
    LoRAConfig(r=2, alpha=3, attn_matrices=["k"], selfattn_lora=True, output_lora=True, leave_out=[0]),
], ids=["default", "qkv_ffn", "k_out_leave0"])
def test_lora_equals_transformers_with_merged_weights(config_name, lora):
    model = tiny_model(config_name)
    model.add_adapter("lo", config=lora, set_active=True)
    randomize_adapter_(model, "lo")
    twin = _transformers_twin(model)
    scaling = lora.alpha / lora.r
    with torch.no_grad():
        for i, layer in enumerate(model.deberta.encoder.layer):
            for parent, attr in _targets(layer, lora):
                module = getattr(parent, attr)
                twin_linear = twin.get_submodule(f"encoder.layer.{i}").get_submodule(
                    _path_in_layer(layer, parent)).__getattr__(attr)
                if i in lora.leave_out:
                    assert "lo" not in module.loras
                    continue
                twin_linear.weight += scaling * module.loras["lo"].lora_B @ module.loras["lo"].lora_A
    inputs = tiny_inputs()
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state
        reference = twin(**inputs).last_hidden_state
        base = _transformers_twin(model)(**inputs).last_hidden_state
    assert (ours - reference).abs().max() <= TOL
    assert (ours - base).abs().max() > 1e-2


def _path_in_layer(layer, module):
    for name, candidate in layer.named_modules():
        if candidate is module:
            return name
    raise AssertionError("module not in layer")


def test_ia3_equals_transformers_with_scaled_weights_and_biases():
    model = tiny_model("v3")
    model.add_adapter("ia", config="ia3", set_active=True)
    randomize_adapter_(model, "ia")
    twin = _transformers_twin(model)
    with torch.no_grad():
        for i, layer in enumerate(model.deberta.encoder.layer):
            for parent, attr in _targets(layer, model.adapters_config.get("ia")):
                scale = getattr(parent, attr).loras["ia"].lora_B.view(-1)
                linear = twin.get_submodule(f"encoder.layer.{i}.{_path_in_layer(layer, parent)}.{attr}")
                linear.weight.mul_(scale[:, None])
                linear.bias.mul_(scale)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert (model(**inputs).last_hidden_state - twin(**inputs).last_hidden_state).abs().max() <= TOL


def test_lora_linear_gating_stack_average_and_dropout():
    model = tiny_model("v3")
    for name, config in (("a", LoRAConfig(r=2, alpha=4)), ("b", LoRAConfig(r=3, alpha=3)),
                         ("g", LoRAConfig(r=2, alpha=4, use_gating=True))):
        model.add_adapter(name, config=config)
        randomize_adapter_(model, name, seed=len(name) + ord(name))
    linear = model.deberta.encoder.layer[0].attention.self.query_proj
    x = torch.randn(2, 5, linear.in_features)
    base = F.linear(x, linear.weight, linear.bias)
    a, b, g = (linear.loras[n] for n in "abg")

    def update(module, source):
        return source @ module.lora_A.t() @ module.lora_B.t()

    with torch.no_grad():
        with AdapterSetup("a"):
            torch.testing.assert_close(linear(x), base + 2.0 * update(a, x), rtol=0, atol=TOL)
        with AdapterSetup("g"):
            gate = torch.sigmoid(x @ g.gate.weight.t() + g.gate.bias).mean(dim=1, keepdim=True)
            torch.testing.assert_close(linear(x), base + gate * update(g, x), rtol=0, atol=TOL)
        with AdapterSetup(Stack("a", "b")):
            first = 2.0 * update(a, x)
            torch.testing.assert_close(linear(x), base + 1.0 * update(b, first), rtol=0, atol=TOL)
        with AdapterSetup(Average("a", "b", weights=[1, 3])):
            mean = (0.25 * 2.0 * update(a, x) + 0.75 * 1.0 * update(b, x)) / 2
            torch.testing.assert_close(linear(x), base + mean, rtol=0, atol=TOL)
        with AdapterSetup("missing_here"):  # exact: only the base linear runs, on the same tensors
            torch.testing.assert_close(linear(x), base, rtol=0, atol=0)

    model.add_adapter("d", config=LoRAConfig(r=2, alpha=2, dropout=0.5))
    randomize_adapter_(model, "d", seed=5)
    d = linear.loras["d"]
    d.train()
    with torch.no_grad(), AdapterSetup("d"):
        torch.manual_seed(11)
        out = linear(x)
        torch.manual_seed(11)
        dropped = F.dropout(x, p=0.5, training=True)
        torch.testing.assert_close(out, base + update(d, dropped), rtol=0, atol=TOL)
        d.eval()
        torch.testing.assert_close(linear(x), base + update(d, x), rtol=0, atol=TOL)


def _bottleneck_reference(adapter, config, h, inp, ln):
    """AdapterHub's placement, written out (see deberta_fast/adapters/methods/bottleneck.py docstring)."""
    act = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
           "gelu_new": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))}[
        config.non_linearity]
    scaling = adapter.scaling
    if config.is_parallel:
        z, residual = inp, None
    else:
        residual = h if config.residual_before_ln is True else None
        z = h
        if config.original_ln_before:
            z = h + inp
            if config.residual_before_ln == "post_add":
                residual = z
            z = ln(z)
        if not config.residual_before_ln:
            residual = z
    x = adapter.adapter_norm_before(z) if config.ln_before else z
    down = adapter.adapter_down[1 if config.ln_before else 0]
    a = F.linear(act(F.linear(x, down.weight, down.bias)), adapter.adapter_up.weight, adapter.adapter_up.bias) * scaling
    if config.use_gating:
        a = a * torch.sigmoid(F.linear(z, adapter.gate.weight, adapter.gate.bias)).mean(dim=1, keepdim=True)
    if residual is not None and config.adapter_residual_before_ln:
        a = a + residual
    if config.ln_after:
        a = adapter.adapter_norm_after(a)
    if residual is not None and not config.adapter_residual_before_ln:
        a = a + residual
    if config.is_parallel:
        a = a + h
    return ln(a + inp) if config.original_ln_after else a


BOTTLENECK_VARIANTS = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "scaled_par_bn": "scaled_par_bn",
    "ln_before_after": "seq_bn[ln_before=True, ln_after=True]",
    "adapter_residual_before_ln": "seq_bn[ln_after=True, adapter_residual_before_ln=True]",
    "residual_after_ln": "seq_bn[residual_before_ln=False]",
    "residual_post_add": "seq_bn[residual_before_ln='post_add']",
    "no_original_ln_after": "seq_bn[original_ln_after=False]",
    "channel_scaling_gating": "seq_bn[scaling='channel', use_gating=True]",
    "gelu_new_eager_path": "double_seq_bn[non_linearity='gelu_new', scaling=0.5]",
    "per_layer_reduction": "seq_bn[reduction_factor={'0': 2, 'default': 8}]",
    "parallel_ln_after": "par_bn[ln_after=True, init_weights='houlsby']",
}


@pytest.mark.parametrize("variant", sorted(BOTTLENECK_VARIANTS))
def test_bottleneck_variants_follow_adapterhub_placement(variant):
    from deberta_fast.adapters import AdapterConfig

    model = tiny_model("v3")
    config = AdapterConfig.load(BOTTLENECK_VARIANTS[variant])
    model.add_adapter("bn", config=config)
    randomize_adapter_(model, "bn", seed=3)
    hidden = model.config.hidden_size
    for i, layer in enumerate(model.deberta.encoder.layer):
        for block, where in ((layer.attention.output, "mh_adapter"), (layer.output, "output_adapter")):
            if not config[where]:
                assert "bn" not in block.adapters
                continue
            adapter = block.adapters["bn"]
            expected_down = max(1, int(hidden // (config.reduction_factor if not isinstance(
                config.reduction_factor, dict) else config.reduction_factor.get(str(i),
                                                                               config.reduction_factor["default"]))))
            assert adapter.adapter_up.in_features == expected_down
            x = torch.randn(2, 5, block.dense.in_features)
            inp = torch.randn(2, 5, hidden)
            with torch.no_grad(), AdapterSetup("bn"):
                ours = block(x, inp)
                h = block.dense(x)
                reference = _bottleneck_reference(adapter, config, h, inp, block.LayerNorm)
            torch.testing.assert_close(ours, reference, rtol=0, atol=TOL)
            with torch.no_grad():  # no active adapter: the fused residual + LayerNorm tail (another rounding order)
                torch.testing.assert_close(block(x, inp), block.LayerNorm(h + inp), rtol=0, atol=TOL)


def test_bottleneck_stack_and_average():
    model = tiny_model("v3")
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="seq_bn[non_linearity='tanh']")
    randomize_adapter_(model, "a", seed=1)
    randomize_adapter_(model, "b", seed=2)
    block = model.deberta.encoder.layer[1].output
    a, b = block.adapters["a"], block.adapters["b"]
    ca, cb = model.adapters_config.get("a"), model.adapters_config.get("b")
    x, inp = torch.randn(2, 4, block.dense.in_features), torch.randn(2, 4, model.config.hidden_size)
    ln = block.LayerNorm
    with torch.no_grad():
        h = block.dense(x)
        with AdapterSetup(Stack("a", "b")):
            after_a = _bottleneck_reference(a, ca.replace(original_ln_after=False), h, inp, ln)
            reference = _bottleneck_reference(b, cb, after_a, inp, ln)
            torch.testing.assert_close(block(x, inp), reference, rtol=0, atol=TOL)
        with AdapterSetup(Average("a", "b", weights=[0.3, 0.7])):
            pre = ln(h + inp)
            core = [_bottleneck_reference(m, c.replace(original_ln_after=False), h, inp, ln) for m, c in
                    ((a, ca), (b, cb))]
            mean = (0.3 * core[0] + 0.7 * core[1]) / 2
            torch.testing.assert_close(block(x, inp), ln(mean + inp), rtol=0, atol=TOL)
            assert pre.shape == mean.shape


def test_initialisation_schemes():
    model = tiny_model("v3")
    inputs = tiny_inputs()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    for name, config, no_op in (("lora", "lora", True), ("ia3", "ia3", True), ("par", "par_bn", True),
                                ("seq", "seq_bn", False), ("hou", "double_seq_bn[init_weights='houlsby']", False),
                                ("lbert", "lora[init_weights='bert']", False)):
        model.add_adapter(name, config=config, set_active=True)
        with torch.no_grad():
            diff = float((model(**inputs).last_hidden_state - base).abs().max())
        # no-op inits add exact zeros (or scale by 1), but an adapter on a block moves it off the fused tail ops
        # (models/output_blocks.py) to the adapter path: the same values up to rounding
        assert (diff <= 1e-5) if no_op else (diff > 1e-4), (name, diff)
    houlsby = model.deberta.encoder.layer[0].output.adapters["hou"].adapter_up.weight
    assert houlsby.abs().max() <= 2e-2
    state = torch.random.get_rng_state()
    model.add_adapter("s1", config="lora[init_weights_seed=5]")
    model.add_adapter("s2", config="lora[init_weights_seed=5]")
    assert torch.equal(torch.random.get_rng_state(), state)  # exact: RNG state bytes
    q0 = model.deberta.encoder.layer[0].attention.self.query_proj.loras
    q1 = model.deberta.encoder.layer[1].attention.self.query_proj.loras
    # exact: one seed, the same draws
    assert torch.equal(q0["s1"].lora_A, q0["s2"].lora_A) and torch.equal(q0["s1"].lora_A, q1["s1"].lora_A)


def test_skip_layers_and_leave_out():
    model = tiny_model("v3")
    model.add_adapter("bn", config=SeqBnConfig(leave_out=[1]))
    randomize_adapter_(model, "bn")
    assert "bn" in model.deberta.encoder.layer[0].output.adapters
    assert "bn" not in model.deberta.encoder.layer[1].output.adapters
    inputs = tiny_inputs()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
        model.set_active_adapters("bn", skip_layers=[0])  # exact: no adapter runs, the same kernels do
        torch.testing.assert_close(model(**inputs).last_hidden_state, base, rtol=0, atol=0)
        model.set_active_adapters("bn")
        assert (model(**inputs).last_hidden_state - base).abs().max() > 1e-3


def test_adapter_setup_context_equals_active_adapters():
    model = tiny_model("v3")
    model.add_adapter("a", config="lora[attn_matrices=['q','k']]")
    model.add_adapter("b", config="double_seq_bn")
    randomize_adapter_(model, "a", seed=1)
    randomize_adapter_(model, "b", seed=2)
    model.add_classification_head("b", num_labels=2)
    inputs = tiny_inputs()
    with torch.no_grad():
        with AdapterSetup(Stack("a", "b")):
            in_context = model(**inputs)
        assert model.active_adapters is None
        model.set_active_adapters(Stack("a", "b"))
        active = model(**inputs)
        assert model.active_head == "b"
        # exact here and below: the same setup runs the same kernels on the same tensors
        torch.testing.assert_close(in_context.logits, active.logits, rtol=0, atol=0)
        with AdapterSetup(None):  # an explicit empty setup runs no adapter even though some are active
            plain = model(**inputs, head="b")
        model.set_active_adapters(None)
        torch.testing.assert_close(plain.logits, model(**inputs, head="b").logits, rtol=0, atol=0)
        assert (plain.logits - active.logits).abs().max() > 1e-4
