"""AdapterFusion API: add / delete / train / regularise / save / load / save_pretrained, AdapterHub's semantics.

Numerical parity with AdapterHub's fusion layers (dynamic, static, every option, fusion attentions) is in
test_adapters_composition_fixtures.py; here the management API, the file format and the formulas.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from deberta_fast import DebertaV2AdapterModel
from deberta_fast.adapters import AdapterFusionConfig, Fuse, Stack


def _fused_model(config="seq_bn"):
    model = tiny_model("v3")
    for name in ("a", "b", "c"):
        model.add_adapter(name, config=config)
        randomize_adapter_(model, name, seed=ord(name))
    return model


def _fusion_keys(model, name):
    return sorted(k for k in model.state_dict() if f".adapter_fusion_layer.{name}." in k)


@pytest.mark.parametrize("spec", [Fuse("a", "b"), ["a", "b"], "a,b"])
def test_add_fusion_from_block_list_or_string(spec):
    model = _fused_model()
    model.add_adapter_fusion(spec)
    assert model.adapters_config.fusions == {"a,b": "dynamic"}
    assert model.adapters_config.fusion_name_map == {"a,b": ["a", "b"]}
    keys = _fusion_keys(model, "a,b")
    # seq_bn sits at the feed-forward output only: one fusion layer per layer there
    assert keys == sorted(f"deberta.encoder.layer.{i}.output.adapter_fusion_layer.a,b.{p}"
                          for i in range(2) for p in ("key.bias", "key.weight", "query.bias", "query.weight",
                                                      "value.weight"))
    value = model.deberta.encoder.layer[0].output.adapter_fusion_layer["a,b"].value.weight
    expected = torch.full((32, 32), 1e-6)
    expected.fill_diagonal_(1.0)
    assert torch.equal(value, expected)  # exact: constants written by the initialiser


def test_fusion_configs_names_and_errors():
    model = _fused_model("double_seq_bn")
    model.add_adapter_fusion(["a", "b"], config="static")
    layer = model.deberta.encoder.layer[1]
    assert {"a,b"} == set(layer.attention.output.adapter_fusion_layer) == set(layer.output.adapter_fusion_layer)
    assert not hasattr(layer.output.adapter_fusion_layer["a,b"], "value")
    custom = dict(AdapterFusionConfig.load("dynamic").to_dict(), temperature=True, dropout_prob=0.25)
    model.add_adapter_fusion(Fuse("b", "c"), config=custom, name="bc", set_active=True)
    assert model.active_adapters == Fuse("b", "c", name="bc")
    config, names = model.adapters_config.get_fusion("bc")
    assert names == ["b", "c"] and config.temperature and config.dropout_prob == 0.25
    fusion = layer.output.adapter_fusion_layer["bc"]
    assert fusion.T == 50.0 and fusion.dropout.p == 0.25
    with pytest.raises(ValueError, match="already been added"):
        model.add_adapter_fusion(["a", "b"])
    model.add_adapter_fusion(["a", "b"], config="dynamic", overwrite_ok=True)
    assert hasattr(layer.output.adapter_fusion_layer["a,b"], "value")
    with pytest.raises(ValueError, match="No adapter with name 'zz'"):
        model.add_adapter_fusion(["a", "zz"])
    with pytest.raises(ValueError, match="Invalid AdapterFusion config"):
        model.add_adapter_fusion(["a", "c"], config="nope")
    assert "a,c" not in model.adapters_config.fusions
    model.add_adapter("s", config="seq_bn")
    with pytest.raises(ValueError, match="same value for config attribute mh_adapter"):
        model.add_adapter_fusion(["a", "s"])
    assert "a,s" not in model.adapters_config.fusions and not _fusion_keys(model, "a,s")
    model.delete_adapter_fusion("bc")
    assert "bc" not in model.adapters_config.fusions and not _fusion_keys(model, "bc")
    assert model.active_adapters is None
    model.delete_adapter_fusion(Fuse("x", "y"))  # unknown: skipped


def test_fuse_without_fusion_layer_is_a_clear_error():
    model = _fused_model()
    model.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(ValueError, match="add_adapter_fusion"):
        model(**tiny_inputs())


def test_train_adapter_fusion_and_regularization_loss():
    model = _fused_model()
    model.add_adapter_fusion(["a", "b"])
    model.add_classification_head("a,b", num_labels=2)
    model.train_adapter_fusion(Fuse("a", "b"))
    assert model.training and model.active_adapters == Fuse("a", "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_fusion_keys(model, "a,b")) | {n for n, _ in model.named_parameters()
                                                            if n.startswith("heads.a,b.")}
    with torch.no_grad():
        for layer in model.deberta.encoder.layer:
            layer.output.adapter_fusion_layer["a,b"].value.weight.add_(0.1)
    values = [layer.output.adapter_fusion_layer["a,b"].value.weight for layer in model.deberta.encoder.layer]
    expected = sum(0.01 * (torch.eye(32) - w).pow(2).sum() for w in values)
    torch.testing.assert_close(model.get_fusion_regularization_loss(), expected)
    loss = model(**tiny_inputs(), labels=torch.tensor([0, 1])).loss + model.get_fusion_regularization_loss()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in set(_fusion_keys(model, "a,b")))
    model.train_adapter_fusion(Fuse("a", "b"), unfreeze_adapters=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".adapters.a." in n)
    with pytest.warns(FutureWarning, match="train_adapter_fusion"):
        model.train_fusion(Fuse("a", "b"))
    model.freeze_model(True)
    assert model.get_fusion_regularization_loss() is None


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_save_and_load_fusion_bitwise(tmp_path, use_safetensors):
    model = _fused_model("double_seq_bn")
    model.add_adapter_fusion(["a", "b"])
    randomize_adapter_(model, "a,b", seed=9, scale=0.05)
    model.add_classification_head("a,b", num_labels=3)
    model.set_active_adapters(Fuse("a", "b"))
    model.eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    for name in ("a", "b"):
        model.save_adapter(str(tmp_path / name), name, use_safetensors=use_safetensors)
    model.save_adapter_fusion(str(tmp_path / "fusion"), "a,b", with_head=True, use_safetensors=use_safetensors)
    weights = "model_adapter_fusion.safetensors" if use_safetensors else "pytorch_model_adapter_fusion.bin"
    assert sorted(os.listdir(tmp_path / "fusion")) == sorted(
        ["adapter_fusion_config.json", weights, "head_config.json",
         "model_head.safetensors" if use_safetensors else "pytorch_model_head.bin"])
    with open(tmp_path / "fusion" / "adapter_fusion_config.json") as handle:
        envelope = json.load(handle)
    assert envelope["name"] == "a,b" and envelope["adapter_names"] == ["a", "b"]
    assert envelope["config"] == AdapterFusionConfig.load("dynamic").to_dict()
    assert "architecture" not in envelope["config"]

    fresh = tiny_model("v3", seed=0)
    for name in ("a", "b"):
        fresh.load_adapter(str(tmp_path / name), use_safetensors=use_safetensors)
    assert fresh.load_adapter_fusion(str(tmp_path / "fusion"), set_active=True,
                                     use_safetensors=use_safetensors) == "a,b"
    fresh.eval()
    with torch.no_grad():
        # loaded weights are new allocations: another GEMM path may round differently
        torch.testing.assert_close(fresh(**inputs).logits, before, rtol=1e-6, atol=1e-6)
    renamed = tiny_model("v3")
    for name in ("a", "b"):
        renamed.load_adapter(str(tmp_path / name))
    assert renamed.load_adapter_fusion(str(tmp_path / "fusion"), load_as="ab", with_head=False) == "ab"
    assert _fusion_keys(renamed, "ab") and renamed.adapters_config.get_fusion("ab")[1] == ["a", "b"]


def test_fusion_errors_on_bad_files(tmp_path):
    model = _fused_model()
    model.add_adapter_fusion(["a", "b"])
    with pytest.raises(ValueError, match="Unknown AdapterFusion 'x,y'"):
        model.save_adapter_fusion(str(tmp_path), ["x", "y"])
    with pytest.raises(ValueError, match="No head with name a,b"):
        model.save_adapter_fusion(str(tmp_path / "f"), "a,b", with_head=True)
    model.save_adapter_fusion(str(tmp_path / "f"), "a,b")
    state = torch.load(tmp_path / "f" / "pytorch_model_adapter_fusion.bin", weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "f" / "pytorch_model_adapter_fusion.bin")
    fresh = _fused_model()
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_adapter_fusion(str(tmp_path / "f"))
    assert "a,b" not in fresh.adapters_config.fusions
    with pytest.raises(ValueError, match="AdapterFusion is saved"):
        fresh.load_adapter_fusion(str(tmp_path / "nowhere"))


def test_save_all_fusions_and_save_pretrained_keep_fusions(tmp_path):
    model = _fused_model()
    model.add_adapter_fusion(["a", "b"])
    model.add_adapter_fusion(["b", "c"], config="static", name="bc")
    randomize_adapter_(model, "a,b", seed=1, scale=0.05)
    randomize_adapter_(model, "bc", seed=2, scale=0.05)
    model.save_all_adapter_fusions(str(tmp_path / "all"))
    assert sorted(os.listdir(tmp_path / "all")) == ["a,b", "bc"]
    with open(tmp_path / "all" / "bc" / "adapter_fusion_config.json") as handle:
        assert "config_id" in json.load(handle)
    model.set_active_adapters(Stack("c", Fuse("a", "b")))
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.save_pretrained(str(tmp_path / "full"))
    with open(tmp_path / "full" / "config.json") as handle:
        section = json.load(handle)["adapters"]
    assert section["fusions"] == {"a,b": "dynamic", "bc": "static"}
    assert section["fusion_name_map"] == {"a,b": ["a", "b"], "bc": ["b", "c"]}
    loaded = DebertaV2AdapterModel.from_pretrained(str(tmp_path / "full")).eval()
    assert set(loaded.adapters_config.fusions) == {"a,b", "bc"}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())  # stored copies
    loaded.set_active_adapters(Stack("c", Fuse("a", "b")))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, before, rtol=1e-6, atol=1e-6)  # reloaded
