"""DoRA, DvoRA, VeRA and MTL-LoRA (AdapterHub 1.3.0's methods): formulas at one linear layer, initialisation and
seeds, exact merges, save / load, averaging, compositions (MultiTask routing, parameter sharing), training state,
and which work stays on the fused LoRA op. Expected values are written out from the papers' / AdapterHub's
formulas with plain torch ops, never taken from the code under test. Parity with AdapterHub's own files and
outputs: test_adapters_lora_family_fixtures.py."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_helpers import tiny_inputs, tiny_model
from deberta_fast.adapters import (
    AdapterConfig,
    Average,
    BatchSplit,
    DoRAConfig,
    DvoRAConfig,
    Fuse,
    LoRAConfig,
    MTLLoRAConfig,
    MultiTask,
    Parallel,
    Stack,
    VeraConfig,
)

TOL = 1e-5


@torch.no_grad()
def _randomize(model, name, seed=7, scale=0.2):
    """Every trained parameter of adapter ``name`` ~ N(0, scale); DoRA magnitudes m · (1 + N(0, scale))."""
    generator = torch.Generator().manual_seed(seed)
    for key, param in model.named_parameters():
        if f".loras.{name}." in key:
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(param * (1 + noise) if key.endswith(".m.weight") else noise)


def _q(model, layer=0):
    return model.deberta.encoder.layer[layer].attention.self.query_proj


def _run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).last_hidden_state


def _x(in_features, seed=0):
    return torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(seed))


# ---- configs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("string, cls, fields", [
    ("dora", DoRAConfig, {"use_dora": True, "vera_d": None}),
    ("dvora", DvoRAConfig, {"use_dora": True, "vera_d": 0.1, "vera_b": 0.0, "init_weights": "vera"}),
    ("vera", VeraConfig, {"use_dora": False, "vera_d": 0.1, "vera_b": 0.0, "init_weights": "vera"}),
    ("mtl_lora", MTLLoRAConfig, {"architecture": "mtl_lora", "n_up_projection": 1,
                                 "task_specific_matrix_type": "singular_values", "weights_sharpness": 0.05}),
])
def test_config_strings_and_defaults(string, cls, fields):
    config = AdapterConfig.load(string)
    assert type(config) is cls
    for key, value in fields.items():
        assert config[key] == value
    model = tiny_model()
    assert model.supports_adapter(config)
    model.add_adapter("x", config=string)


def test_supports_mtl_lora_method_and_refuses_impossible_combinations():
    model = tiny_model()
    assert model.supports_adapter("mtl_lora") and model.supports_adapter("lora")
    for config in ("mtl_lora[use_dora=True]", "ia3[use_dora=True]", "vera[vera_d=None]",
                   "mtl_lora[vera_d=0.1, vera_b=0.0]"):
        assert not model.supports_adapter(AdapterConfig.load(config))
        with pytest.raises(ValueError, match="not supported"):
            model.add_adapter("x", config=config)
        assert "x" not in model.adapters_config


# ---- DoRA -------------------------------------------------------------------------------------------------------

def test_dora_layer_formula():
    """y = m / ‖W + BA‖_row ⊙ (x Wᵀ + b + s · x Aᵀ Bᵀ), s = alpha / r, the norm on the unscaled BA."""
    model = tiny_model()
    model.add_adapter("d", config=LoRAConfig(use_dora=True, r=4, alpha=12), set_active=True)
    _randomize(model, "d")
    layer = _q(model)
    lora = layer.loras["d"]
    x = _x(layer.in_features)
    w, b, a, bb, m = layer.weight, layer.bias, lora.lora_A, lora.lora_B, lora.m.weight[:, 0]
    expected = (m / torch.linalg.norm(w + bb @ a, dim=1)) * (x @ w.T + b + 3.0 * (x @ a.T @ bb.T))
    with torch.no_grad():
        assert float((layer(x) - expected).abs().max()) <= TOL


def test_dora_starts_as_the_identity_and_magnitude_is_the_row_norm():
    model = tiny_model()
    inputs = tiny_inputs()
    base = _run(model, inputs)
    model.add_adapter("d", config="dora", set_active=True)
    layer = _q(model)
    assert layer.loras["d"].m.weight.shape == (layer.out_features, 1)
    torch.testing.assert_close(layer.loras["d"].m.weight[:, 0], torch.linalg.norm(layer.weight, dim=1))
    assert float((_run(model, inputs) - base).abs().max()) <= TOL  # B = 0, m = ‖W‖: no change
    assert not torch.equal(layer.loras["d"].lora_A, torch.zeros_like(layer.loras["d"].lora_A))


# ---- VeRA -------------------------------------------------------------------------------------------------------

def test_vera_layout_init_and_formula():
    """Shared frozen A [r, in], B [out, r]; per layer vera_D = diag(d) [r, r], vera_B = diag(b) [out, out];
    y = x Wᵀ + b + s · x (vera_B B vera_D A)ᵀ."""
    model = tiny_model()
    model.add_adapter("v", config=VeraConfig(r=4, alpha=8, vera_d=0.3, vera_b=0.7), set_active=True)
    layer = _q(model)
    vera = layer.loras["v"]
    shared = model.deberta.shared_parameters["v"]
    assert shared["lora_A"].shape == (4, layer.in_features) and shared["lora_B"].shape == (layer.out_features, 4)
    assert not shared["lora_A"].requires_grad and not shared["lora_B"].requires_grad
    torch.testing.assert_close(vera.vera_D, torch.diag(torch.full((4,), 0.3)))
    torch.testing.assert_close(vera.vera_B, torch.diag(torch.full((layer.out_features,), 0.7)))
    # kaiming-uniform (a=0) bounds: sqrt(6 / fan_in)
    assert float(shared["lora_A"].abs().max()) <= (6 / layer.in_features) ** 0.5
    assert float(shared["lora_B"].abs().max()) <= (6 / 4) ** 0.5
    _randomize(model, "v")
    x = _x(layer.in_features)
    delta = vera.vera_B @ shared["lora_B"] @ vera.vera_D @ shared["lora_A"]
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ delta.T)
    with torch.no_grad():
        assert float((layer(x) - expected).abs().max()) <= TOL
    # every layer reads the same shared matrices
    assert _q(model, 1).loras["v"].delta_w.shape == delta.shape


def test_vera_default_is_a_no_op_and_seed_fixes_the_shared_matrices():
    model = tiny_model()
    inputs = tiny_inputs()
    base = _run(model, inputs)
    model.add_adapter("v", config="vera[init_weights_seed=11]", set_active=True)
    assert float((_run(model, inputs) - base).abs().max()) <= TOL  # vera_b = 0
    other = tiny_model(seed=5)
    other.add_adapter("w", config="vera[init_weights_seed=11]")
    other.add_adapter("z", config="vera[init_weights_seed=12]")
    for key in ("lora_A", "lora_B"):
        assert torch.equal(model.deberta.shared_parameters["v"][key], other.deberta.shared_parameters["w"][key])
        assert not torch.equal(other.deberta.shared_parameters["w"][key], other.deberta.shared_parameters["z"][key])


def test_vera_on_linears_of_different_shapes_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="same \\(in, out\\) shape"):
        model.add_adapter("v", config="vera[intermediate_lora=True]")
    assert "v" not in model.adapters_config and "v" not in model.deberta.shared_parameters


def test_dvora_formula():
    model = tiny_model()
    model.add_adapter("dv", config=DvoRAConfig(r=4, alpha=4), set_active=True)
    _randomize(model, "dv")
    layer = _q(model)
    module = layer.loras["dv"]
    shared = model.deberta.shared_parameters["dv"]
    x = _x(layer.in_features)
    delta = module.vera_B @ shared["lora_B"] @ module.vera_D @ shared["lora_A"]
    m = module.m.weight[:, 0]
    expected = (m / torch.linalg.norm(layer.weight + delta, dim=1)) * (x @ layer.weight.T + layer.bias + x @ delta.T)
    with torch.no_grad():
        assert float((layer(x) - expected).abs().max()) <= TOL


# ---- MTL-LoRA ---------------------------------------------------------------------------------------------------

def test_mtl_lora_layout_init_and_formula():
    """lora_A [r, in], lora_B [n, out, r] (zeros with init "lora"), weights [n] and task_specific.values [r] ones;
    y = x Wᵀ + b + s · Σ_i softmax(weights / sharpness)_i · x Aᵀ diag(values) B_iᵀ."""
    model = tiny_model()
    model.add_adapter("t", config=MTLLoRAConfig(n_up_projection=3, r=4, alpha=8, weights_sharpness=0.5),
                      set_active=True)
    layer = _q(model)
    module = layer.loras["t"]
    assert module.lora_B.shape == (3, layer.out_features, 4) and not module.lora_B.any()
    assert torch.equal(module.weights, torch.ones(3)) and torch.equal(module.task_specific.values, torch.ones(4))
    _randomize(model, "t")
    x = _x(layer.in_features)
    w = torch.softmax(module.weights / 0.5, dim=0)
    low = x @ module.lora_A.T @ torch.diag(module.task_specific.values)
    update = sum(w[i] * (low @ module.lora_B[i].T) for i in range(3))
    expected = x @ layer.weight.T + layer.bias + 2.0 * update
    with torch.no_grad():
        assert float((layer(x) - expected).abs().max()) <= TOL


def test_mtl_lora_linear_task_matrix():
    model = tiny_model()
    model.add_adapter("t", config="mtl_lora[task_specific_matrix_type='linear', r=4]", set_active=True)
    _randomize(model, "t")
    layer = _q(model)
    module = layer.loras["t"]
    assert module.task_specific.values.shape == (4, 4)
    x = _x(layer.in_features)
    # n = 1: the softmax weight is 1; s = alpha / r = 8 / 4
    update = x @ module.lora_A.T @ module.task_specific.values @ module.lora_B[0].T
    expected = x @ layer.weight.T + layer.bias + 2.0 * update
    with torch.no_grad():
        assert float((layer(x) - expected).abs().max()) <= TOL


def test_mtl_lora_seeded_bert_init_is_reproducible():
    one, two = tiny_model(), tiny_model(seed=3)
    for model in (one, two):
        model.add_adapter("t", config="mtl_lora[init_weights='bert', init_weights_seed=4, n_up_projection=2]")
    a, b = _q(one).loras["t"], _q(two).loras["t"]
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert a.lora_B.abs().sum() > 0
    # every layer of a seeded adapter starts from the same values (AdapterHub's meaning of the seed)
    assert torch.equal(a.lora_A, _q(one, 1).loras["t"].lora_A)


@pytest.mark.parametrize("config_name", ["v3", "v2_xlarge"])
def test_multitask_routes_each_row_to_its_task(config_name):
    model = tiny_model(config_name)
    inputs = tiny_inputs(batch=4)
    names = ["t0", "t1", "t2"]
    for j, name in enumerate(names):
        model.add_adapter(name, config="mtl_lora[n_up_projection=2, attn_matrices=['q','k','v'], output_lora=True]")
        _randomize(model, name, seed=20 + j)
    singles = []
    for name in names:
        model.set_active_adapters(name)
        singles.append(_run(model, inputs))
    model.set_active_adapters(MultiTask(*names))
    task_ids = [2, 0, 1, 2]
    for ids in (task_ids, torch.tensor(task_ids), [names[t] for t in task_ids]):
        out = _run(model, inputs, task_ids=ids)
        for row, task in enumerate(task_ids):
            assert float((out[row] - singles[task][row]).abs().max()) <= TOL
    with pytest.raises(ValueError, match="task_ids"):
        _run(model, inputs)


def test_share_parameters_ties_lora_a_and_b_and_unshare_unties():
    model = tiny_model()
    inputs = tiny_inputs(batch=2)
    for j, name in enumerate(("t0", "t1")):
        model.add_adapter(name, config="mtl_lora[init_weights='bert', n_up_projection=2]")
        _randomize(model, name, seed=j)
    reference_a = _q(model).loras["t1"].lora_A.detach().clone()
    model.share_parameters(MultiTask("t0", "t1"), reference_adapter_name="t1")
    layer = _q(model)
    assert layer.loras["t0"].lora_A is layer.loras["t1"].lora_A is layer.shared_parameters["t0,t1"]["lora_A"]
    assert layer.loras["t0"].lora_B is layer.shared_parameters["t0,t1"]["lora_B"]
    assert torch.equal(layer.loras["t0"].lora_A, reference_a)
    assert "deberta.encoder.layer.0.attention.self.query_proj.shared_parameters.t0,t1.lora_A" in model.state_dict()
    # the task-specific parts stay per task
    assert layer.loras["t0"].task_specific.values is not layer.loras["t1"].task_specific.values
    # one gradient step through task t0 moves the shared matrices of t1 too
    model.train_adapter(MultiTask("t0", "t1"))
    out = model(**inputs, task_ids=[0, 0]).last_hidden_state
    out.pow(2).mean().backward()
    with torch.no_grad():
        layer.loras["t0"].lora_A.sub_(layer.loras["t0"].lora_A.grad)
    assert torch.equal(layer.loras["t1"].lora_A, layer.loras["t0"].lora_A)
    model.unshare_parameters("t0,t1")
    assert "t0,t1" not in layer.shared_parameters
    assert layer.loras["t0"].lora_A is not layer.loras["t1"].lora_A
    assert torch.equal(layer.loras["t0"].lora_A, layer.loras["t1"].lora_A)


def test_shared_mtl_lora_saves_as_copies_and_stays_tied(tmp_path):
    from deberta_fast import DebertaV2AdapterModel

    model = tiny_model()
    inputs = tiny_inputs(batch=2)
    for j, name in enumerate(("t0", "t1")):
        model.add_adapter(name, config="mtl_lora[init_weights='bert']")
        _randomize(model, name, seed=j)
    model.share_parameters("t0,t1")
    model.set_active_adapters(MultiTask("t0", "t1"))
    expected = _run(model, inputs, task_ids=[1, 0])
    model.save_pretrained(str(tmp_path))
    layer = _q(model)
    assert layer.loras["t0"].lora_A is layer.loras["t1"].lora_A is layer.shared_parameters["t0,t1"]["lora_A"]
    other = DebertaV2AdapterModel.from_pretrained(str(tmp_path)).eval()
    other.set_active_adapters(MultiTask("t0", "t1"))
    assert float((_run(other, inputs, task_ids=[1, 0]) - expected).abs().max()) <= 1e-6


def test_share_parameters_checks_its_arguments():
    model = tiny_model()
    model.add_adapter("t0", config="mtl_lora")
    model.add_adapter("l", config="lora")
    with pytest.raises(TypeError, match="MultiTaskConfig"):
        model.share_parameters(["t0", "l"])
    with pytest.raises(ValueError, match="No configuration"):
        model.share_parameters(["t0", "nope"])
    model.add_adapter("t1", config="mtl_lora")
    with pytest.raises(ValueError, match="Reference adapter"):
        model.share_parameters("t0,t1", reference_adapter_name="l")


# ---- merge / reset, save / load, average -----------------------------------------------------------------------

METHODS = {
    "dora": "lora[use_dora=True, r=4, alpha=12, attn_matrices=['q','k','v'], intermediate_lora=True, output_lora=True]",
    "vera": "vera[r=4, alpha=16, attn_matrices=['q','k','v']]",
    "dvora": "dvora[r=4, alpha=2]",
    "mtl_lora": "mtl_lora[n_up_projection=3, r=4, alpha=8, intermediate_lora=True, output_lora=True]",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_is_exact_and_reset_restores_the_weights(method):
    model = tiny_model()
    inputs = tiny_inputs()
    base = _run(model, inputs)
    model.add_adapter("a", config=METHODS[method], set_active=True)
    _randomize(model, "a")
    unmerged = _run(model, inputs)
    assert float((unmerged - base).abs().max()) > 1e-3
    # Merging re-associates fp32 sums (x(W + ΔW) against xW + x·ΔW), which round differently on each CPU and vector
    # ISA (VeRA reached 1.2e-5 from unmerged with ATEN_CPU_CAPABILITY=default, its unmerged fp32 run being 1.0e-5 from
    # float64 itself). Numerics policy: against a float64 run of the unmerged model, the merged model's error is at
    # most twice the unmerged fp32 model's own, plus a floor.
    oracle = _run(copy.deepcopy(model).double(), inputs)
    own_error = float((unmerged.double() - oracle).abs().max())
    saved = {k: v.clone() for k, v in model.deberta.state_dict().items()}
    model.merge_adapter("a")
    merged_error = float((_run(model, inputs).double() - oracle).abs().max())
    assert merged_error <= 2 * own_error + 1e-6, (merged_error, own_error)
    model.reset_adapter()
    for key, value in model.deberta.state_dict().items():
        # reset puts the tensors saved at merge time back (no arithmetic inverse)
        assert torch.equal(value, saved[key]), key
    assert float((_run(model, inputs) - unmerged).abs().max()) <= TOL


def test_gated_dora_cannot_merge():
    model = tiny_model()
    model.add_adapter("a", config="dora[use_gating=True]")
    with pytest.raises(ValueError, match="gating"):
        model.merge_adapter("a")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_round_trip(method, tmp_path):
    model = tiny_model()
    inputs = tiny_inputs()
    model.add_adapter("a", config=METHODS[method], set_active=True)
    _randomize(model, "a")
    expected = _run(model, inputs)
    model.save_adapter(str(tmp_path / "a"), "a", use_safetensors=True)
    other = tiny_model()
    assert other.load_adapter(str(tmp_path / "a"), set_active=True) == "a"
    assert float((_run(other, inputs) - expected).abs().max()) <= 1e-6
    saved = set(other._adapter_state_dict("a"))
    assert any(".loras.a." in k for k in saved)
    assert (method in ("vera", "dvora")) == ("deberta.shared_parameters.a.lora_A" in saved)


def test_vera_load_as_renames_the_shared_matrices_and_delete_removes_them(tmp_path):
    model = tiny_model()
    inputs = tiny_inputs()
    model.add_adapter("a", config="dvora[vera_b=0.5]", set_active=True)
    expected = _run(model, inputs)
    model.save_adapter(str(tmp_path), "a")
    other = tiny_model()
    assert other.load_adapter(str(tmp_path), load_as="b", set_active=True) == "b"
    assert list(other.deberta.shared_parameters) == ["b"]
    assert float((_run(other, inputs) - expected).abs().max()) <= 1e-6
    other.delete_adapter("b")
    assert not list(other.deberta.shared_parameters) and not other.get_adapter("b")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_pretrained_from_pretrained_and_gradient_checkpointing(method, tmp_path):
    from deberta_fast import DebertaV2AdapterModel

    model = tiny_model()
    inputs = tiny_inputs()
    model.add_adapter("a", config=METHODS[method], set_active=True)
    _randomize(model, "a")
    expected = _run(model, inputs)
    model.save_pretrained(str(tmp_path))
    other = DebertaV2AdapterModel.from_pretrained(str(tmp_path)).eval()
    other.set_active_adapters("a")
    assert float((_run(other, inputs) - expected).abs().max()) <= 1e-6
    grads = []
    for checkpointing in (True, False):
        model.train_adapter("a")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        model(**inputs).last_hidden_state.pow(2).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key, value in grads[1].items():
        torch.testing.assert_close(grads[0][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dora", "vera", "mtl_lora"])
def test_linear_average_weights_every_tensor(method):
    model = tiny_model()
    for j in range(2):
        model.add_adapter(f"s{j}", config=METHODS[method])
        _randomize(model, f"s{j}", seed=j)
    model.average_adapter("avg", ["s0", "s1"], weights=[1.0, 3.0])
    for key, value in model._adapter_state_dict("avg").items():
        first = model._adapter_state_dict("s0")[key.replace(".avg.", ".s0.")]
        second = model._adapter_state_dict("s1")[key.replace(".avg.", ".s1.")]
        torch.testing.assert_close(value, 0.25 * first + 0.75 * second)
    if method == "vera":
        assert not model.deberta.shared_parameters["avg"]["lora_A"].requires_grad
        with pytest.raises(ValueError):
            model.average_adapter("neg", ["s0", "s1"], combine_strategy="lora_linear_only_negate_b")
        assert "neg" not in model.adapters_config


# ---- compositions -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["Parallel", "BatchSplit"])
def test_row_splitting_blocks_finish_each_row_with_its_own_adapter(block):
    """Each channel / row group is rescaled by its own DoRA magnitude (AdapterHub uses the last adapter's m for
    every row); compared with single-adapter runs."""
    model = tiny_model("v3")
    inputs = tiny_inputs(batch=2)
    configs = {"d": "dora[attn_matrices=['q','k','v']]", "v": "vera[vera_b=0.3]", "t": "mtl_lora"}
    singles = {}
    for j, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config=config)
        _randomize(model, name, seed=j)
        model.set_active_adapters(name)
        singles[name] = _run(model, inputs)
    names = list(configs)
    if block == "Parallel":
        model.set_active_adapters(Parallel(*names))
        out = _run(model, inputs)
        for i, name in enumerate(names):
            assert float((out[2 * i:2 * i + 2] - singles[name]).abs().max()) <= TOL
    else:
        batch = tiny_inputs(batch=3)
        singles = {}
        for name in names:
            model.set_active_adapters(name)
            singles[name] = _run(model, batch)
        model.set_active_adapters(BatchSplit(*names, batch_sizes=[1, 1, 1]))
        out = _run(model, batch)
        for i, name in enumerate(names):
            assert float((out[i] - singles[name][i]).abs().max()) <= TOL


def test_stack_and_average_follow_adapterhubs_rules():
    """Stack(lora, dora): the DoRA update reads the LoRA update, and the DoRA magnitude rescales the sum;
    Average: the mean of the weighted updates, finished by the last adapter."""
    model = tiny_model()
    model.add_adapter("l", config="lora[r=4, attn_matrices=['v']]")
    model.add_adapter("d", config="dora[r=4, alpha=8, attn_matrices=['v']]")
    _randomize(model, "l", seed=1)
    _randomize(model, "d", seed=2)
    layer = model.deberta.encoder.layer[0].attention.self.value_proj
    lo, do = layer.loras["l"], layer.loras["d"]
    x = _x(layer.in_features)
    base = x @ layer.weight.T + layer.bias
    first = 2.0 * (x @ lo.lora_A.T @ lo.lora_B.T)  # s = alpha / r = 8 / 4
    scale = do.m.weight[:, 0] / torch.linalg.norm(layer.weight + do.lora_B @ do.lora_A, dim=1)
    with torch.no_grad():
        model.set_active_adapters(Stack("l", "d"))
        stacked = scale * (base + 2.0 * (first @ do.lora_A.T @ do.lora_B.T))
        assert float((layer(x) - stacked).abs().max()) <= TOL
        model.set_active_adapters(Average("l", "d", weights=[0.25, 0.75]))
        mean = (0.25 * first + 0.75 * 2.0 * (x @ do.lora_A.T @ do.lora_B.T)) / 2
        assert float((layer(x) - scale * (base + mean)).abs().max()) <= TOL


def test_fuse_is_not_supported_for_the_lora_family():
    model = tiny_model()
    inputs = tiny_inputs()
    model.add_adapter("a", config="dora")
    model.add_adapter("b", config="dora")
    model.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(NotImplementedError):
        _run(model, inputs)


# ---- training ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_adapter_trains_the_method_parameters_only(method):
    model = tiny_model()
    inputs = tiny_inputs()
    model.add_adapter("a", config=METHODS[method])
    _randomize(model, "a")
    model.train_adapter("a")
    model(**inputs).last_hidden_state.pow(2).mean().backward()
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".loras.a." in k for k in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in model.named_parameters()
               if p.requires_grad and "layer.1." in k)
    if method in ("vera", "dvora"):
        assert not any(p.requires_grad for p in model.deberta.shared_parameters["a"].values())
    if method in ("dora", "dvora"):
        assert any(k.endswith(".m.weight") for k in trained)


# ---- fused path (issue 14 item 3) -------------------------------------------------------------------------------

def test_fused_lora_op_serves_plain_and_merged_adapters_only():
    """``fusable_lora`` is what the attention's fused q/k/v op runs: a plain LoRA (A, B, s, p) or nothing extra
    (merged); unmerged DoRA / VeRA / MTL-LoRA need their module (None: eager)."""
    model = tiny_model()
    for name, config in {"l": "lora", "d": "dora", "v": "vera", "t": "mtl_lora"}.items():
        model.add_adapter(name, config=config)
    layer = _q(model)
    model.set_active_adapters("l")
    plan = layer.fusable_lora()
    assert isinstance(plan, tuple) and plan[0] is layer.loras["l"].lora_A
    for name in ("d", "v", "t"):
        model.set_active_adapters(name)
        assert layer.fusable_lora() is None
        assert layer._single_adapter(model.active_adapters) is None
        model.merge_adapter(name)
        assert layer.fusable_lora() == ()
        model.reset_adapter()
