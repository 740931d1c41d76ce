"""Checkpoints load and save both ways between transformers and deberta_fast."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from configs import make_config, perturb_

MICROSOFT_V3_STYLE = {
    # As config.json files of microsoft/deberta-v3-* ship: pos_att_type as a string, no pad_token_id, max_relative
    # _positions -1 (resolved to max_position_embeddings), no architectures entry.
    "model_type": "deberta-v2",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "p2c|c2p",
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "type_vocab_size": 0,
    "vocab_size": 101,
}


def _write_checkpoint(directory, config_dict, state_dict, weights_format):
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config_dict, handle)
    if weights_format == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"))
    else:
        torch.save(state_dict, os.path.join(directory, "pytorch_model.bin"))


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_microsoft_style_checkpoint_loads(tmp_path, weights_format):
    reference_config = hf.DebertaV2Config(**{k: v for k, v in MICROSOFT_V3_STYLE.items() if k != "model_type"})
    torch.manual_seed(0)
    reference = perturb_(hf.DebertaV2Model(reference_config)).eval()
    _write_checkpoint(tmp_path, MICROSOFT_V3_STYLE, reference.state_dict(), weights_format)

    fast = deberta_fast.DebertaV2Model.from_pretrained(tmp_path).eval()
    assert fast.config.pos_att_type == ["p2c", "c2p"]
    attention = fast.encoder.layer[0].attention.self
    assert attention.position_spec.max_relative_positions == 512 and attention.position_spec.att_span == 256
    input_ids = torch.randint(1, 101, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask).last_hidden_state
        got = fast(input_ids, attention_mask=mask).last_hidden_state
    assert (expected - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("class_name", ["DebertaV2Model", "DebertaV2ForSequenceClassification", "DebertaV2ForMaskedLM"])
def test_deberta_fast_save_loads_in_transformers(tmp_path, class_name):
    config = make_config("v2_xlarge", num_labels=3)
    torch.manual_seed(0)
    fast = perturb_(getattr(deberta_fast, class_name)(config)).eval()
    fast.save_pretrained(tmp_path)
    reference = getattr(hf, class_name).from_pretrained(tmp_path).eval()
    assert type(reference) is getattr(hf, class_name)
    input_ids = torch.randint(1, config.vocab_size, (2, 21))
    with torch.no_grad():
        expected = reference(input_ids)[0]
        got = fast(input_ids)[0]
    assert (expected - got).abs().max().item() <= 1e-5


def test_seeded_initialisation_equals_transformers():
    """deberta_fast builds transformers' modules and then switches them: the same seed gives the same weights."""
    config = make_config("v3")
    torch.manual_seed(7)
    reference = hf.DebertaV2ForSequenceClassification(config)
    torch.manual_seed(7)
    fast = deberta_fast.DebertaV2ForSequenceClassification(config)
    for (name, a), (_, b) in zip(reference.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), name  # exact: the same seeded draws, copied into the same modules
