"""Save / load round trips of every method, fusion and head reproduce the outputs (fp32, within 1e-6).

Not bit for bit: the state dicts are equal after loading, but freshly allocated parameters may take another
GEMM path (alignment, packing) on some CPUs, which rounds differently in the last ulp (seen on AMD Zen 4).

Three paths per case: save_adapter / load_adapter in AdapterHub's torch format, the same with safetensors, and
save_pretrained / from_pretrained of the whole model (config.json's "adapters" and "prediction_heads").
"""

from __future__ import annotations

import pytest
import torch

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from deberta_fast import DebertaV2AdapterModel
from deberta_fast.adapters import BatchSplit, Fuse, Parallel, Stack

METHODS = {
    "seq_bn": "seq_bn",
    "lora_qkv": "lora[attn_matrices=['q','k','v'], intermediate_lora=True]",
    "ia3": "ia3",
    "prefix": "prefix_tuning[prefix_length=3, bottleneck_size=16]",
    "prefix_flat_gated": "prefix_tuning_flat[prefix_length=2, use_gating=True, shared_gating=False]",
    "prompt": "prompt_tuning[prompt_length=3]",
    "compacter": "compacter[reduction_factor=4]",
    "compacter_pp_shared_w": "compacter++[reduction_factor=8, shared_W_phm=True, phm_dim=2]",
    "compacter_own_rule": "compacter[reduction_factor=4, shared_phm_rule=False]",
    "loreft": "loreft[r=2, suffix_positions=1]",
    "noreft": "noreft",
    "direft": "direft[r=2]",
    "mam": "mam",
    "unipelt": "unipelt",
}
HEADS = {
    "classification": ("add_classification_head", {"num_labels": 3}),
    "tagging": ("add_tagging_head", {"num_labels": 4}),
    "qa": ("add_qa_head", {}),
    "masked_lm": ("add_masked_lm_head", {}),
}


def _outputs(model, inputs) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    result = {"hidden": out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None
              else out.last_hidden_state}
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(out, key, None) is not None:
            result[key] = getattr(out, key)
    return result


def _assert_equal(a: dict, b: dict) -> None:
    """Same outputs up to GEMM rounding; a lost or wrong parameter changes them by orders of magnitude more."""
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("use_safetensors", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_save_adapter_round_trip(method, use_safetensors, tmp_path):
    model = tiny_model("v3")
    model.add_adapter("x", config=METHODS[method])
    randomize_adapter_(model, "x")
    model.add_classification_head("x", num_labels=3)
    randomize_adapter_(model, "x")
    model.set_active_adapters("x")
    inputs = tiny_inputs()
    before = _outputs(model, inputs)
    model.save_adapter(str(tmp_path), "x", use_safetensors=use_safetensors)
    fresh = tiny_model("v3")
    assert fresh.load_adapter(str(tmp_path), use_safetensors=use_safetensors, set_active=True) == "x"
    assert fresh.adapters_config.get("x") == model.adapters_config.get("x")
    _assert_equal(_outputs(fresh, inputs), before)


def test_direft_keeps_subtract_projection(tmp_path):
    """AdapterHub drops DiReFT's subtract_projection=False on save (its reload is NoReFT, output off by 1e-3)."""
    model = tiny_model("v3")
    model.add_adapter("d", config="direft")
    model.save_adapter(str(tmp_path), "d")
    assert '"subtract_projection": false' in (tmp_path / "adapter_config.json").read_text()
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path))
    assert fresh.adapters_config.get("d").subtract_projection is False
    units = fresh.deberta.encoder.layer[0].reft_layer.refts["d"].units
    assert not any(unit.subtract_projection for unit in units)


@pytest.mark.parametrize("head", list(HEADS))
def test_heads_round_trip(head, tmp_path):
    model = tiny_model("v3")
    model.add_adapter("h", config="lora[attn_matrices=['q','k']]|prefix_tuning[prefix_length=2, bottleneck_size=8]")
    method, kwargs = HEADS[head]
    getattr(model, method)("h", **kwargs)
    randomize_adapter_(model, "h")
    model.set_active_adapters("h")
    inputs = tiny_inputs()
    before = _outputs(model, inputs)
    model.save_adapter(str(tmp_path / "a"), "h")
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    _assert_equal(_outputs(fresh, inputs), before)
    model.save_pretrained(str(tmp_path / "full"))
    loaded = DebertaV2AdapterModel.from_pretrained(str(tmp_path / "full"))
    loaded.set_active_adapters("h")
    _assert_equal(_outputs(loaded, inputs), before)


def test_save_pretrained_round_trip_of_every_method_fusion_and_composition(tmp_path):
    model = tiny_model("v3")
    for name, config in METHODS.items():
        model.add_adapter(name, config=config)
        randomize_adapter_(model, name, seed=len(name))
    model.add_adapter_fusion(["seq_bn", "compacter_pp_shared_w"])
    randomize_adapter_(model, "seq_bn,compacter_pp_shared_w", seed=3, scale=0.05)
    model.add_classification_head("seq_bn", num_labels=2)
    model.add_classification_head("prefix", num_labels=2)
    setups = [Stack("prompt", "lora_qkv", "unipelt"), Fuse("seq_bn", "compacter_pp_shared_w"),
              Parallel("prefix", "seq_bn"), BatchSplit("loreft", "mam", batch_sizes=[1, 1]), "direft",
              "compacter_own_rule", "prefix_flat_gated", "ia3", "noreft", "compacter"]
    inputs = tiny_inputs()
    before = []
    for setup in setups:
        model.set_active_adapters(setup)
        model.active_head = None  # heads: test_heads_round_trip
        before.append(_outputs(model, inputs))
    model.save_pretrained(str(tmp_path))
    loaded = DebertaV2AdapterModel.from_pretrained(str(tmp_path))
    assert set(loaded.adapters_config) == set(METHODS) and set(loaded.heads) == {"seq_bn", "prefix"}
    state = loaded.state_dict()
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # exact: stored copies
    for setup, expected in zip(setups, before):
        loaded.set_active_adapters(setup)
        loaded.active_head = None
        _assert_equal(_outputs(loaded, inputs), expected)
