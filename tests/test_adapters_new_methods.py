"""Prefix tuning, prompt tuning, Compacter, ReFT and unions: formulas, management and training API.

AdapterHub parity of the outputs is in test_adapters_composition_fixtures.py; here formulas written out
independently (PHM as a sum of Kronecker products, ReFT's intervention), eject_prefix_tuning, the Triton backend
with prefix keys, adapter_summary, train_adapter and average_adapter for the new methods.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapters_helpers import randomize_adapter_, run_like_adapterhub, tiny_inputs, tiny_model
from deberta_fast.adapters import BatchSplit, ConfigUnion, LoRAConfig, PrefixTuningConfig, SeqBnConfig, Stack
from deberta_fast.models import set_attention_backend

TOL = 1e-5


def _output(model, inputs, setup):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _params_of(model, name):
    segments = (f".adapters.{name}.", f".loras.{name}.", f".prefix_tunings.{name}.", f".prefix_gates.{name}.",
                f".refts.{name}.", f".prompt_tunings.{name}.", f".shared_parameters.{name}.")
    return {n for n, _ in model.named_parameters() if any(s in n for s in segments)}


# ---- prefix tuning ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["prefix_tuning[prefix_length=3, bottleneck_size=16]",
                                    "prefix_tuning[prefix_length=3, bottleneck_size=16, use_gating=True]",
                                    "mam[]"])
def test_eject_prefix_tuning_keeps_the_output_and_reloads(config, tmp_path):
    """AdapterHub keeps flat=False after ejecting, so its saved file cannot be loaded back (missing / unexpected
    keys); here the config says flat=True and the round trip is exact."""
    model = tiny_model("v3")
    if config == "mam[]":
        config = ConfigUnion(PrefixTuningConfig(prefix_length=2, bottleneck_size=8), SeqBnConfig(reduction_factor=8))
    model.add_adapter("p", config=config)
    randomize_adapter_(model, "p")
    inputs = tiny_inputs()
    before = _output(model, inputs, "p")
    model.eject_prefix_tuning("p")
    after = _output(model, inputs, "p")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert model.adapters_config.match("p", PrefixTuningConfig).flat is True
    assert [k for k in model.state_dict() if ".prefix_tunings." in k] == [
        "deberta.prefix_tuning.prefix_tunings.p.self_prefix.control_trans"]
    model.save_adapter(str(tmp_path), "p")
    with open(tmp_path / "adapter_config.json") as handle:
        saved = json.load(handle)["config"]
    members = saved["configs"] if saved["architecture"] == "union" else [saved]
    assert [m["flat"] for m in members if m.get("architecture") == "prefix_tuning"] == [True]
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path))
    # a fresh model's weights are new allocations: another GEMM path may round differently
    torch.testing.assert_close(_output(fresh, inputs, "p"), after, rtol=1e-6, atol=1e-6)


def test_prefix_keys_get_no_positional_bias():
    """A prefix key identical to a content key must score like it minus the positional terms: checked through the
    attention probabilities (output_attentions) of one layer against the plain softmax of QKᵀ over the prefix."""
    model = tiny_model("v3")
    model.add_adapter("p", config="prefix_tuning_flat[prefix_length=2]")
    randomize_adapter_(model, "p")
    model.set_active_adapters("p")
    inputs = tiny_inputs(batch=1)
    attention = model.deberta.encoder.layer[0].attention.self
    captured = {}
    handle = attention.register_forward_hook(lambda m, args, out: captured.update(probs=out[1], x=args[0]))
    with torch.no_grad():
        model(**inputs, output_attentions=True)
    handle.remove()
    probs = captured["probs"]
    assert probs.shape == (1, 4, 9, 2 + 9)
    keys, _ = model.deberta.prefix_tuning.prefix_tunings["p"]["self_prefix"](1)[0]
    query = attention._heads(attention.query_proj(captured["x"]))
    prefix_scores = (query @ keys.transpose(-1, -2)) * attention.softmax_scale
    # the ratio of two prefix probabilities depends on their content scores only
    ratio = probs[..., 0] / probs[..., 1]
    torch.testing.assert_close(ratio, torch.exp(prefix_scores[..., 0] - prefix_scores[..., 1]), rtol=1e-4, atol=0)


def test_triton_backend_serves_prefix_keys_and_per_row_tables_under_the_interpreter(monkeypatch):
    """backend="triton" on CPU tensors runs the Triton interpreter: prefixes of two lengths (one op call per row
    group) and per-row position tables (q/k LoRA under BatchSplit), against the reference backend. Tiny shapes."""
    model = tiny_model("v3", num_attention_heads=2, num_hidden_layers=1)
    model.add_adapter("p", config="prefix_tuning[prefix_length=2, bottleneck_size=8]")
    model.add_adapter("q", config="prefix_tuning[prefix_length=3, bottleneck_size=8]|lora[attn_matrices=['q','k']]")
    randomize_adapter_(model, "p", seed=1)
    randomize_adapter_(model, "q", seed=2)
    inputs = tiny_inputs(batch=2, length=7)
    setup = BatchSplit("p", "q", batch_sizes=[1, 1])
    set_attention_backend(model, "reference")
    reference = _output(model, inputs, setup)
    from deberta_fast.ops import attention as attention_op

    calls = []
    run = attention_op._RUN["triton"]
    monkeypatch.setitem(attention_op._RUN, "triton", lambda *call: calls.append(call[-1]) or run(*call))
    set_attention_backend(model, "triton")
    triton = _output(model, inputs, setup)
    assert calls == [2, 3]  # one call per row group, with its number of prefix keys
    torch.testing.assert_close(triton, reference, rtol=0, atol=1e-5)
    single = _output(model, inputs, "q")
    torch.testing.assert_close(triton[1], single[1], rtol=0, atol=1e-5)


# ---- prompt tuning ------------------------------------------------------------------------------------------------

def test_prompt_tuning_shapes_heads_and_init():
    model = tiny_model("v3")
    model.add_adapter("p", config="prompt_tuning[prompt_length=4]")
    weight = model.deberta.prompt_tuning.prompt_tunings["p"].prompt_embedding.weight
    assert weight.shape == (4, 32) and weight.abs().max() <= 0.5
    model.add_tagging_head("p", num_labels=3)
    model.train_adapter("p")
    inputs = tiny_inputs()
    labels = torch.randint(0, 3, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, 13, 3)
    # the prompt positions are ignored by the loss: the loss equals the one over the real positions
    logits = out.logits[:, 4:].reshape(-1, 3)
    kept = inputs["attention_mask"].reshape(-1) == 1
    expected = torch.nn.functional.cross_entropy(logits[kept], labels.reshape(-1)[kept])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---- Compacter ----------------------------------------------------------------------------------------------------

def test_phm_layer_is_a_sum_of_kronecker_products():
    model = tiny_model("v3")
    model.add_adapter("c", config="compacter[reduction_factor=4, phm_rank=2]")
    randomize_adapter_(model, "c")
    layer = model.deberta.encoder.layer[1].output.adapters["c"].adapter_down[0]
    rule = model.deberta.shared_parameters["c"]["phm_rule"]
    slices = torch.bmm(layer.W_left, layer.W_right)
    expected = sum(torch.kron(rule[i], slices[i]) for i in range(4))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ expected + layer.b, rtol=1e-5, atol=1e-6)
    # the rule is shared by every layer and both locations of the adapter
    for block in (model.deberta.encoder.layer[0].attention.output, model.deberta.encoder.layer[0].output):
        assert block.adapters["c"].adapter_up.rule() is rule


# ---- ReFT ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["loreft[r=2]", "noreft[suffix_positions=2]", "direft[r=2, tied_weights=True, "
                                                                                 "suffix_positions=1]"])
def test_reft_intervention_formula(config):
    model = tiny_model("v3")
    model.add_adapter("r", config=config)
    randomize_adapter_(model, "r")
    model.set_active_adapters("r")
    module = model.deberta.encoder.layer[1].reft_layer.refts["r"]
    inputs = tiny_inputs()
    seen = {}
    handle = model.deberta.encoder.layer[1].register_forward_hook(lambda m, args, out: seen.update(out=out[0]))
    pre = model.deberta.encoder.layer[1].output.register_forward_hook(lambda m, args, out: seen.update(x=out))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    pre.remove()
    x, out = seen["x"], seen["out"]
    expected = x.clone()
    lengths = inputs["attention_mask"].sum(-1)
    for row in range(2):
        positions = list(range(module.prefix_positions))
        suffix = [int(lengths[row]) - k for k in range(module.suffix_positions, 0, -1)]
        groups = [positions + suffix] if module.tied_weights else [positions, suffix]
        for unit, group in zip(module.units, groups):
            for position in group:
                h = x[row, position]
                w = unit.projection.weight
                source = unit.learned_source(h) - (w @ h if unit.subtract_projection else 0)
                expected[row, position] = h + source @ w
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---- management ---------------------------------------------------------------------------------------------------

NEW_METHODS = {
    "prefix": ("prefix_tuning[prefix_length=3, bottleneck_size=16, use_gating=True]", "prefix_tuning"),
    "prompt": ("prompt_tuning[prompt_length=2]", "prompt_tuning"),
    "compacter": ("compacter[reduction_factor=4]", "bottleneck"),
    "compacterpp": ("compacter++[reduction_factor=4, shared_W_phm=True]", "bottleneck"),
    "reft": ("loreft[r=2]", "reft"),
    "unipelt": ("unipelt", "union"),
}


def test_summary_and_train_adapter_for_new_methods():
    model = tiny_model("v3")
    for name, (config, _) in NEW_METHODS.items():
        model.add_adapter(name, config=config)
    rows = {row["name"]: row for row in model.adapter_summary(as_dict=True)}
    for name, (_, architecture) in NEW_METHODS.items():
        params = _params_of(model, name)
        assert rows[name]["architecture"] == architecture
        assert rows[name]["#param"] == sum(p.numel() for n, p in model.named_parameters() if n in params), name
    base = sum(p.numel() for n, p in model.named_parameters() if n.startswith("deberta."))
    assert rows["Full model"]["#param"] == base - sum(rows[n]["#param"] for n in NEW_METHODS)
    table = model.adapter_summary()
    assert f"{'compacterpp':<25}{'bottleneck':<15}" in table
    for name in NEW_METHODS:
        model.train_adapter(name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == _params_of(model, name), name
        assert model.adapter_summary(as_dict=True)[list(NEW_METHODS).index(name)]["train"]


@pytest.mark.parametrize("name", list(NEW_METHODS))
def test_average_adapter_for_new_methods(name):
    """Every tensor of the new adapter (prefix pool and gates, prompts, PHM weights and shared rule, ReFT units)
    is the weighted sum of the sources', as in AdapterHub."""
    config, _ = NEW_METHODS[name]
    model = tiny_model("v3")
    model.add_adapter("x", config=config)
    model.add_adapter("y", config=config)
    randomize_adapter_(model, "x", seed=1)
    randomize_adapter_(model, "y", seed=2)
    model.average_adapter("avg", ["x", "y"], weights=[1, 3])
    state = dict(model.named_parameters())
    averaged = sorted(_params_of(model, "avg"))
    assert averaged and len(averaged) == len(_params_of(model, "x"))
    for key in averaged:
        source = key.replace(".avg.", ".{}.")
        torch.testing.assert_close(state[key], 0.25 * state[source.format("x")] + 0.75 * state[source.format("y")])
    assert torch.isfinite(_output(model, tiny_inputs(), "avg")).all()


def test_custom_config_union_runs_every_member():
    union = ConfigUnion(LoRAConfig(r=4, attn_matrices=["q", "k"]), PrefixTuningConfig(prefix_length=2,
                                                                                      bottleneck_size=8),
                        SeqBnConfig(reduction_factor=8))
    model = tiny_model("v3")
    model.add_adapter("u", config=union)
    randomize_adapter_(model, "u")
    found = model.get_adapter("u")
    assert set(found[0]) == {"selfattn_lora", "self_prefix", "output_adapter"}
    inputs = tiny_inputs()
    full = _output(model, inputs, "u")
    without_prefix = tiny_model("v3")
    without_prefix.add_adapter("u", config=ConfigUnion(union.configs[0], union.configs[2]))
    without_prefix.load_state_dict({k: v for k, v in model.state_dict().items() if ".prefix_" not in k},
                                   strict=False)
    assert (full - _output(without_prefix, inputs, "u")).abs().max() > 1e-3
    assert run_like_adapterhub(model, inputs)["last_hidden_state"].shape == (2, 9, 32)
    model.set_active_adapters(Stack("u"))


def test_patch_deberta_leaves_an_adapter_model_as_it_is():
    import deberta_fast

    model = tiny_model("v3")
    model.add_adapter("p", config="prefix_tuning[prefix_length=2, bottleneck_size=8]")
    classes = [type(m) for m in model.modules()]
    assert deberta_fast.patch_deberta(model) is model
    assert [type(m) for m in model.modules()] == classes
