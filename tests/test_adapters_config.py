"""Adapter configs, config strings, hashes and composition blocks (AdapterHub 1.3.0 semantics)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from deberta_fast.adapters import (
    ADAPTER_CONFIG_MAP,
    ALLOWED_NESTINGS,
    AdapterConfig,
    AdapterSetup,
    Average,
    BatchSplit,
    ConfigUnion,
    DoubleSeqBnConfig,
    Fuse,
    IA3Config,
    LoRAConfig,
    Parallel,
    ParBnConfig,
    SeqBnConfig,
    Split,
    Stack,
    parse_composition,
)
from deberta_fast.adapters.composition.blocks import parse_heads_from_composition
from deberta_fast.adapters.configuration import adapter_config_hash, parse_config_string

# Hashes computed by AdapterHub 1.3.0's own get_adapter_config_hash (run once outside this repository).
ADAPTERHUB_HASHES = {
    "seq_bn": "9076f36a74755ac4",
    "double_seq_bn": "b1017368d7a97b11",
    "par_bn": "211b85d66ae909db",
    "scaled_par_bn": "4197b24ec21c92f8",
    "lora": "625403edad0bf919",
    "ia3": "1ebb5af107e576c0",
    "unipelt": "67ac4937c601ad56",
    "mam": "97453c0dbc2dbc97",
}


@pytest.mark.parametrize("name", sorted(ADAPTERHUB_HASHES))
def test_config_hash_equals_adapterhub(name):
    assert adapter_config_hash(ADAPTER_CONFIG_MAP[name]) == ADAPTERHUB_HASHES[name]


def test_config_hash_of_custom_configs_equals_adapterhub():
    lora = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)
    assert adapter_config_hash(lora) == "03458429f9bf5217"
    bn = SeqBnConfig(reduction_factor={"0": 8, "default": 16}, ln_before=True, init_weights="houlsby",
                     scaling="channel")
    assert adapter_config_hash(bn) == "ab4ecb4c07b80042"
    assert adapter_config_hash(AdapterConfig.load("lora[r=4, alpha=16, attn_matrices=['q','k']]")) == "efbdfd3edd20dcea"
    assert adapter_config_hash(AdapterConfig.load("lora[r=4]|seq_bn[reduction_factor=4]")) == "aaf1d2a2ec1f3c0f"
    ignored = adapter_config_hash(LoRAConfig(dropout=0.1, init_weights="bert"), ignore_params=["dropout",
                                                                                              "init_weights"])
    assert ignored == "1fe725fa3c5ce335"


def test_defaults_are_adapterhubs():
    assert LoRAConfig().to_dict() == {
        "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
        "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False,
        "leave_out": [], "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False,
        "use_gating": False, "vera_b": None, "vera_d": None}
    ia3 = IA3Config()
    assert (ia3.r, ia3.alpha, ia3.attn_matrices, ia3.composition_mode, ia3.init_weights, ia3.intermediate_lora) == (
        1, 1, ["k", "v"], "scale", "ia3", True)
    seq = SeqBnConfig()
    assert "architecture" not in seq.to_dict()
    assert (seq.mh_adapter, seq.output_adapter, seq.reduction_factor, seq.non_linearity, seq.original_ln_before,
            seq.residual_before_ln, seq.init_weights) == (False, True, 16, "relu", True, True, "bert")
    houlsby = DoubleSeqBnConfig()
    assert (houlsby.mh_adapter, houlsby.output_adapter, houlsby.non_linearity, houlsby.original_ln_before) == (
        True, True, "swish", False)
    par = ParBnConfig()
    assert (par.reduction_factor, par.scaling, par.is_parallel, par.init_weights) == (2, 4.0, True, "mam_adapter")
    assert ADAPTER_CONFIG_MAP["scaled_par_bn"].scaling == "learned"
    for old, new in (("pfeiffer", "seq_bn"), ("houlsby", "double_seq_bn"), ("parallel", "par_bn")):
        assert ADAPTER_CONFIG_MAP[old] == ADAPTER_CONFIG_MAP[new]


def test_config_strings_with_overrides():
    assert parse_config_string("lora[r=4, alpha=16]") == [("lora", {"r": 4, "alpha": 16})]
    config = AdapterConfig.load("seq_bn[reduction_factor=8, non_linearity='gelu']")
    assert isinstance(config, SeqBnConfig) and config.reduction_factor == 8 and config.non_linearity == "gelu"
    union = AdapterConfig.load("lora[r=4]|seq_bn")
    assert isinstance(union, ConfigUnion) and union[0].r == 4 and isinstance(union[1], SeqBnConfig)
    assert AdapterConfig.load("lora", r=2).r == 2 and AdapterConfig.load("lora", r=None).r == 8


def test_dict_json_round_trip(tmp_path):
    for config in (LoRAConfig(r=4), IA3Config(), SeqBnConfig(reduction_factor={"1": 4, "default": 16}),
                   ParBnConfig(scaling="learned"), AdapterConfig.load("lora|double_seq_bn[mh_adapter=False]")):
        data = json.loads(json.dumps(config.to_dict()))
        again = AdapterConfig.load(data)
        # as in AdapterHub, the JSON form resolves to the method's base class (LoRAConfig, BnConfig, ConfigUnion)
        assert again == config and again.to_dict() == config.to_dict()
        assert adapter_config_hash(again) == adapter_config_hash(config)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"config": LoRAConfig(r=2).to_dict(), "name": "x"}))
    assert AdapterConfig.load(str(path)) == LoRAConfig(r=2)


def test_configs_are_immutable():
    config = LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 2
    assert config.replace(r=2).r == 2 and config.r == 8


@pytest.mark.parametrize("bad", ["lora[rank=4]", {"architecture": "lora", "rank": 4}, "seq_bn[reduction=2]"])
def test_unknown_config_key_is_a_value_error(bad):
    with pytest.raises(ValueError, match="unknown config key"):
        AdapterConfig.load(bad)


@pytest.mark.parametrize("bad", ["lorax", "lora[r=4]|nope", {"architecture": "adapterX"}, "lora[r=]"])
def test_unknown_method_is_a_value_error(bad):
    with pytest.raises(ValueError):
        AdapterConfig.load(bad)


def test_union_rejects_two_modules_at_one_place():
    with pytest.raises(ValueError, match="same adapter architecture"):
        ConfigUnion(LoRAConfig(), IA3Config())
    with pytest.raises(ValueError, match="cannot be combined"):
        ConfigUnion(SeqBnConfig(), ParBnConfig())
    ConfigUnion(DoubleSeqBnConfig(mh_adapter=True, output_adapter=False), SeqBnConfig())


def test_composition_parsing_and_nesting():
    assert parse_composition("a") == Stack("a")
    assert parse_composition(None) is None
    with pytest.warns(FutureWarning):
        assert parse_composition(["a", "b"]) == Stack("a", "b")
    assert Stack("a", Fuse("b", "c")).flatten() == {"a", "b", "c"}
    assert Fuse("b", "c").name == "b,c" and Fuse("b", "c", name="f").name == "f"
    assert Parallel("a", "b").parallel_channels == 2 and Stack("a", Parallel("b", "c")).parallel_channels == 2
    assert Average("a", "b", weights=[1, 3]).weights == [0.25, 0.75]
    assert Average("a", "b", weights=[1, 3], normalize_weights=False).weights == [1, 3]
    assert Split("a", "b", splits=4).splits == [4, 4] and BatchSplit("a", "b", batch_sizes=[1, 2]).batch_sizes == [1, 2]
    for parent, allowed in ALLOWED_NESTINGS.items():
        for child in (Stack, Fuse, Split, Parallel, BatchSplit, Average):
            kwargs = {Split: {"splits": 1}, BatchSplit: {"batch_sizes": 1}}.get(child, {})
            block = parent(child("x", "y", **kwargs), **{Split: {"splits": 1}, BatchSplit: {"batch_sizes": 1}}.get(
                parent, {}))
            if child in allowed:
                parse_composition(block)
            else:
                with pytest.raises(ValueError, match="Cannot nest|too deep"):
                    parse_composition(block)
    data = Stack("a", Average("b", "c", weights=[1, 1])).to_dict()
    assert data == {"type": "Stack", "children": [{"type": "single", "children": ["a"]}, {
        "type": "Average", "children": [{"type": "single", "children": ["b"]}, {"type": "single", "children": ["c"]}],
        "kwargs": {"weights": [0.5, 0.5]}}]}
    assert Stack.from_dict(data) == Stack("a", Average("b", "c"))


def test_heads_from_composition():
    assert parse_heads_from_composition(Stack("a", "b")) == "b"
    assert parse_heads_from_composition(Stack("a", Parallel("b", Stack("c", "d")))) == ["b", "d"]
    assert parse_heads_from_composition(BatchSplit("a", "b", batch_sizes=[1, 1])) == BatchSplit("a", "b",
                                                                                                  batch_sizes=[1, 1])
    assert parse_heads_from_composition(Stack("a", "b"), reference_heads=["a"]) is None


def test_adapter_setup_nests_and_restores():
    assert AdapterSetup.get_context() is None
    with AdapterSetup("a") as outer:
        assert AdapterSetup.get_context_adapter_setup() == Stack("a") and outer.head_setup == "a"
        with AdapterSetup(Stack("b", "c"), head_setup="h"):
            assert AdapterSetup.get_context_adapter_setup() == Stack("b", "c")
            assert AdapterSetup.get_context_head_setup() == "h"
        assert AdapterSetup.get_context_adapter_setup() == Stack("a")
        with AdapterSetup(None, ignore_empty=True):
            assert AdapterSetup.get_context_adapter_setup() == Stack("a")
    assert AdapterSetup.get_context() is None
