"""save_adapter / load_adapter / save_pretrained / from_pretrained: round trips, options, atomic and strict I/O."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from configs import make_config
from deberta_fast import DebertaV2AdapterModel
from deberta_fast.adapters.persistence import files as persistence


def _outputs(model, **kwargs):
    with torch.no_grad():
        return model(**tiny_inputs(), **kwargs)


@pytest.mark.parametrize("use_safetensors", [False, True])
@pytest.mark.parametrize("config", ["lora[attn_matrices=['q','k','v'], intermediate_lora=True]", "ia3",
                                    "seq_bn[ln_before=True, ln_after=True]", "scaled_par_bn", "lora|double_seq_bn"])
def test_adapter_round_trip(config, use_safetensors, tmp_path):
    model = tiny_model("v3")
    model.add_adapter("a", config=config)
    randomize_adapter_(model, "a")
    model.add_classification_head("a", num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    model.set_active_adapters("a")
    expected = _outputs(model).logits
    model.save_adapter(str(tmp_path), "a", use_safetensors=use_safetensors)
    names = {persistence.SAFE_WEIGHTS_NAME if use_safetensors else persistence.WEIGHTS_NAME,
             persistence.SAFE_HEAD_WEIGHTS_NAME if use_safetensors else persistence.HEAD_WEIGHTS_NAME,
             persistence.CONFIG_NAME, persistence.HEAD_CONFIG_NAME}
    assert set(os.listdir(tmp_path)) == names

    fresh = tiny_model("v3")
    name = fresh.load_adapter(str(tmp_path), use_safetensors=use_safetensors, set_active=True)
    assert name == "a" and fresh.active_head == "a" and fresh.get_labels() == ["x", "y", "z"]
    # loaded weights are new allocations: another GEMM path may round differently, hence 1e-6
    torch.testing.assert_close(_outputs(fresh).logits, expected, rtol=1e-6, atol=1e-6)

    other = tiny_model("v3")
    assert other.load_adapter(str(tmp_path), load_as="b", with_head=True) == "b"
    assert "b" in other.heads and other.active_head is None and not other.active_adapters
    other.set_active_adapters("b")
    torch.testing.assert_close(_outputs(other).logits, expected, rtol=1e-6, atol=1e-6)


def test_load_options_leave_out_id2label_without_head(tmp_path):
    model = tiny_model("v3")
    model.add_adapter("a", config="double_seq_bn")
    model.add_tagging_head("a", num_labels=2)
    model.save_adapter(str(tmp_path), "a")
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path), leave_out=[1], id2label={0: "O", 1: "B"})
    assert set(fresh.get_adapter("a")) == {0}
    assert fresh.adapters_config.get("a").leave_out == [1]
    assert fresh.get_labels("a") == ["O", "B"]
    bare = tiny_model("v3")
    bare.load_adapter(str(tmp_path), with_head=False)
    assert len(bare.heads) == 0


def test_saved_json_is_adapterhubs_layout(tmp_path):
    model = tiny_model("v3")
    model.add_adapter("lo", config="lora[init_weights='bert']")
    model.save_adapter(str(tmp_path), "lo", meta_dict={"extra": 1})
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert not text.endswith("\n") and text == json.dumps(data, indent=2, sort_keys=True)
    assert data == {"config": {"alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"],
                               "composition_mode": "add", "dropout": 0.0, "dtype": None, "init_weights": "bert",
                               "init_weights_seed": None, "intermediate_lora": False, "leave_out": [],
                               "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False,
                               "use_gating": False, "vera_b": None, "vera_d": None},
                    "extra": 1, "hidden_size": 32, "model_class": "DebertaV2AdapterModel", "model_name": "",
                    "model_type": "deberta-v2", "name": "lo", "version": "adapters.1.3.0"}
    model.add_adapter("bn", config="seq_bn")
    model.save_all_adapters(str(tmp_path / "all"))
    assert sorted(os.listdir(tmp_path / "all")) == ["bn", "lo"]
    saved = json.loads((tmp_path / "all" / "bn" / "adapter_config.json").read_text())
    assert saved["config_id"] == "9076f36a74755ac4" and "architecture" not in saved["config"]


def test_pre_1_1_lora_loads_with_alpha_equal_r(tmp_path, caplog):
    model = tiny_model("v3")
    model.add_adapter("old", config="lora[r=4, alpha=16]")
    model.save_adapter(str(tmp_path), "old")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["version"] = "adapters.1.0.1"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path))
    assert fresh.adapters_config.get("old").alpha == 4
    assert fresh.deberta.encoder.layer[0].attention.self.query_proj.loras["old"].scaling == 1.0
    data["version"] = "adapters.1.1.0"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    current = tiny_model("v3")
    current.load_adapter(str(tmp_path))
    assert current.adapters_config.get("old").alpha == 16


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny_model("v3")
    model.add_adapter("a", config="lora")
    model.save_adapter(str(tmp_path), "a")
    good = (tmp_path / persistence.WEIGHTS_NAME).read_bytes()
    randomize_adapter_(model, "a")

    def interrupted(obj, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half-written")
        raise KeyboardInterrupt("simulated crash while saving")

    monkeypatch.setattr(persistence.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(str(tmp_path), "a")
    assert (tmp_path / persistence.WEIGHTS_NAME).read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == sorted([persistence.WEIGHTS_NAME, persistence.CONFIG_NAME])


def test_truncated_file_error_names_the_file(tmp_path):
    model = tiny_model("v3")
    model.add_adapter("a", config="seq_bn")
    for use_safetensors, name in ((False, persistence.WEIGHTS_NAME), (True, persistence.SAFE_WEIGHTS_NAME)):
        directory = tmp_path / name
        model.save_adapter(str(directory), "a", use_safetensors=use_safetensors)
        path = directory / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        fresh = tiny_model("v3")
        with pytest.raises(OSError, match=str(path).replace(".", r"\.")):
            fresh.load_adapter(str(directory), use_safetensors=use_safetensors)
        assert not fresh.has_adapters()


def test_missing_and_unexpected_keys_raise_naming_file_and_keys(tmp_path):
    model = tiny_model("v3")
    model.add_adapter("a", config="lora")
    model.save_adapter(str(tmp_path), "a", use_safetensors=True)
    path = tmp_path / persistence.SAFE_WEIGHTS_NAME
    state = load_file(str(path))
    dropped = "deberta.encoder.layer.1.attention.self.value_proj.loras.a.lora_B"
    state.pop(dropped)
    state["deberta.encoder.layer.0.attention.self.key_proj.loras.a.lora_A"] = torch.zeros(8, 32)
    save_file(state, str(path))
    fresh = tiny_model("v3")
    with pytest.raises(ValueError) as error:
        fresh.load_adapter(str(tmp_path), use_safetensors=True)
    message = str(error.value)
    assert str(path) in message and dropped in message and "key_proj.loras.a.lora_A" in message
    assert "missing keys" in message and "unexpected keys" in message
    assert not fresh.has_adapters()
    state = load_file(str(path))
    state.pop("deberta.encoder.layer.0.attention.self.key_proj.loras.a.lora_A")
    state[dropped] = torch.zeros(32, 3)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="shape mismatches"):
        fresh.load_adapter(str(tmp_path), use_safetensors=True)


def test_save_pretrained_from_pretrained_keep_adapters_and_heads(tmp_path):
    config = make_config("v3")
    model = tiny_model("v3")
    model.add_adapter("lo", config="lora[r=4]")
    model.add_adapter("bn", config="double_seq_bn")
    randomize_adapter_(model, "lo")
    randomize_adapter_(model, "bn", seed=9)
    model.add_masked_lm_head("bn")
    model.add_classification_head("lo", num_labels=3)
    model.set_active_adapters("bn")
    expected = _outputs(model).logits
    model.save_pretrained(str(tmp_path))
    assert not hasattr(model.config, "adapters") and not hasattr(model.config, "prediction_heads")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["adapters"]["adapters"]) == {"lo", "bn"}
    assert saved["adapters"]["adapters"]["bn"] == "b1017368d7a97b11"  # AdapterHub's hash of double_seq_bn
    assert set(saved["adapters"]) == {"adapters", "config_map", "fusions", "fusion_config_map", "fusion_name_map"}
    assert saved["prediction_heads"]["bn"]["head_type"] == "masked_lm"
    assert saved["prediction_heads"]["lo"]["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert "heads.bn.3.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = DebertaV2AdapterModel.from_pretrained(str(tmp_path)).eval()
    assert set(loaded.adapters_config) == {"lo", "bn"} and set(loaded.heads) == {"bn", "lo"}
    assert loaded.heads["bn"][3].weight is loaded.deberta.embeddings.word_embeddings.weight
    loaded.set_active_adapters("bn")
    torch.testing.assert_close(_outputs(loaded).logits, expected, rtol=1e-6, atol=1e-6)  # reloaded: new allocations
    other = DebertaV2AdapterModel(config)
    assert len(other.heads) == 0


def test_from_pretrained_of_plain_base_checkpoint(tmp_path):
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    torch.manual_seed(0)
    base = hf.DebertaV2Model(make_config("v3")).eval()
    base.save_pretrained(str(tmp_path))
    model = DebertaV2AdapterModel.from_pretrained(str(tmp_path)).eval()
    assert len(model.heads) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs()).last_hidden_state,
                                   base(**tiny_inputs()).last_hidden_state, rtol=0, atol=1e-5)
