"""Clear errors (ValueError, AdapterHub's conditions) and the model left unchanged after each."""

from __future__ import annotations

import pytest
import torch

from adapters_helpers import tiny_inputs, tiny_model
from deberta_fast.adapters import AdapterSetup, Average, BatchSplit, Fuse, Parallel, Split, Stack


@pytest.fixture
def model():
    model = tiny_model("v3")
    model.add_adapter("a", config="lora")
    model.add_classification_head("a")
    return model


def test_unknown_adapter_names(model, tmp_path):
    for call in (lambda: model.set_active_adapters("nope"), lambda: model.set_active_adapters(Stack("a", "nope")),
                 lambda: model.train_adapter("nope"), lambda: model.save_adapter(str(tmp_path), "nope"),
                 lambda: model.merge_adapter("nope"), lambda: model.average_adapter("x", ["a", "nope"]),
                 lambda: model.adapter_to("nope", "cpu")):
        with pytest.raises(ValueError, match="nope"):
            call()
    with pytest.raises(ValueError, match="nope"), AdapterSetup("nope"):
        model(**tiny_inputs())
    assert list(model.adapters_config) == ["a"] and not list(tmp_path.iterdir())


def test_unknown_head_names(model):
    for call in (lambda: setattr(model, "active_head", "nope"), lambda: model(**tiny_inputs(), head="nope"),
                 lambda: model.get_labels("nope"), lambda: model.save_head("/tmp/never", "nope")):
        with pytest.raises(ValueError, match="nope"):
            call()
    model.active_head = None
    with pytest.raises(ValueError, match="No head name given"):
        model.get_labels()


def test_duplicate_names_need_overwrite_ok(model):
    with pytest.raises(ValueError, match="already been added"):
        model.add_adapter("a", config="seq_bn")
    assert model.adapters_config.get("a").architecture == "lora"
    model.add_adapter("a", config="seq_bn", overwrite_ok=True)
    assert model.adapters_config.get("a").architecture is None and "a" in model.deberta.encoder.layer[0].output.adapters
    assert "a" not in model.deberta.encoder.layer[0].attention.self.query_proj.loras
    with pytest.raises(ValueError, match="already contains a head"):
        model.add_classification_head("a")
    model.add_classification_head("a", num_labels=5, overwrite_ok=True)
    assert model.heads["a"][4].out_features == 5
    model.add_adapter("b", config="lora")
    with pytest.raises(ValueError, match="already been added"):
        model.average_adapter("b", ["a"])


@pytest.mark.parametrize("config", ["lora[rank=4]", "lorra", {"architecture": "nope"},
                                    {"architecture": "lora", "rr": 1}])
def test_unknown_config_key_or_method(model, config):
    with pytest.raises(ValueError):
        model.add_adapter("new", config=config)
    assert "new" not in model.adapters_config


@pytest.mark.parametrize("config", ["seq_bn_inv[inv_adapter='real_nvp']", "lora[attn_matrices=['o']]",
                                    "mtl_lora[use_dora=True]", "ia3[use_dora=True]", "vera[vera_d=None]"])
def test_methods_not_run_by_this_version_raise(model, config):
    with pytest.raises(ValueError, match="not supported by this model"):
        model.add_adapter("new", config=config)
    assert "new" not in model.adapters_config and not model.get_adapter("new")


def test_compacter_bottleneck_must_divide_by_phm_dim(model):
    """hidden 32 // reduction_factor 32 = 1 is not a multiple of phm_dim 4 (AdapterHub: AssertionError)."""
    with pytest.raises(ValueError, match="not divisible by phm_dim=4"):
        model.add_adapter("new", config="compacter")
    assert "new" not in model.adapters_config and not model.get_adapter("new")
    assert "new" not in model.deberta.shared_parameters


def test_merge_errors(model):
    model.add_adapter("g", config="lora[use_gating=True]")
    with pytest.raises(ValueError, match="Cannot merge LoRA layer with gating"):
        model.merge_adapter("g")
    model.add_adapter("b", config="lora")
    model.merge_adapter("a")
    with pytest.raises(ValueError, match="already has a merged LoRA module"):
        model.merge_adapter("b")
    assert all(layer.merged == "a" for layer in model._lora_layers() if layer.loras)
    model.add_adapter("bn", config="seq_bn")
    with pytest.raises(ValueError, match="only those can be merged"):
        model.merge_adapter("bn")


def test_invalid_values_and_arguments(model):
    with pytest.raises(ValueError, match="r == 1"):
        model.add_adapter("x", config="ia3[r=2]")
    with pytest.raises(ValueError, match="does not support dropout"):
        model.add_adapter("x", config="ia3[dropout=0.1]")
    with pytest.raises(ValueError, match="unknown activation"):
        model.add_adapter("x", config="seq_bn[non_linearity='nope']")
    with pytest.raises(ValueError, match="no entry for layer"):
        model.add_adapter("x", config="seq_bn[reduction_factor={'0': 4}]")
    with pytest.raises(ValueError, match="places no module"):
        model.add_adapter("x", config="lora[leave_out=[0, 1]]")
    with pytest.raises(ValueError, match="may not contain"):
        model.add_adapter("x.y")
    with pytest.raises(ValueError, match="lora_delta_w_svd"):
        model.average_adapter("x", ["a"], combine_strategy="lora_delta_w_svd")
    with pytest.raises(ValueError, match="different configurations"):
        model.add_adapter("s", config="seq_bn")
        model.average_adapter("x", ["a", "s"])
    assert "x" not in model.adapters_config
    with pytest.raises(TypeError, match="lables"):
        model(**tiny_inputs(), lables=torch.tensor([0, 1]))
    model.active_head = None
    with pytest.raises(ValueError, match="no prediction head is active"):
        model(**tiny_inputs(), labels=torch.tensor([0, 1]))


def test_blocks_a_method_cannot_run_raise_adapterhubs_error(model):
    """LoRA runs Stack, BatchSplit, Average, Parallel (and MultiTask); Fuse and Split raise NotImplementedError, as
    in AdapterHub; prefix tuning has no Average."""
    model.add_adapter("b", config="lora")
    inputs = tiny_inputs()
    for setup in (Fuse("a", "b"), Split("a", "b", splits=[4, 5])):
        model.set_active_adapters(setup)
        with pytest.raises(NotImplementedError, match=type(setup).__name__):
            model(**inputs)
    model.add_adapter("p", config="prefix_tuning[prefix_length=2]")
    model.add_adapter("q", config="prefix_tuning[prefix_length=2]")
    model.set_active_adapters(Average("p", "q"))
    with pytest.raises(NotImplementedError, match="Average"):
        model(**inputs)
    with pytest.raises(ValueError, match="Adapter setup is invalid. Cannot nest"):
        model.set_active_adapters(Fuse("a", Parallel("a", "b")))
    with pytest.raises(ValueError, match="Adapter setup is too deep"):
        model.set_active_adapters(Stack("a", Average("a", BatchSplit(Stack("a"), "b", batch_sizes=[1, 1]))))
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with pytest.raises(IndexError, match="not equal to the sum of batch_sizes"):
        model(**inputs)
