"""Every DeBERTa-v2 config transformers accepts is accepted here, with transformers' meaning, and a refused patch
leaves the model exactly as it was.

transformers reads the position terms with ``"c2p" in pos_att_type`` / ``"p2c" in pos_att_type`` and ignores any other
entry ("None" from its own model tester becomes ["none"]: no position term); it counts the terms in the softmax
scale even without relative attention; position_buckets <= 0 means no log buckets; max_relative_positions < 1 means
max_position_embeddings; norm_rel_ebd, conv_kernel_size / conv_act, share_att_key, attention_head_size,
embedding_size and position_biased_input change the modules. Each config below is checked against transformers'
model from the same seed, through deberta_fast's class and through ``patch_deberta``, with and without attention
probabilities (the latter served by the fused CPU op when it is built).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DebertaV2Config
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from configs import BASE, perturb_
from deberta_fast.models import DisentangledSelfAttention

RELATIVE = dict(relative_attention=True, position_buckets=8, max_relative_positions=40)
# name -> overrides of configs.BASE (tiny, dropout off)
CONFIGS = {
    "tester_none_string": dict(relative_attention=False, pos_att_type="None", type_vocab_size=16),
    "relative_none_string": dict(RELATIVE, pos_att_type="None"),
    "relative_empty_string": dict(RELATIVE, pos_att_type=""),
    "relative_empty_list": dict(RELATIVE, pos_att_type=[]),
    "relative_null": dict(RELATIVE, pos_att_type=None),
    "absolute_scale_counts_terms": dict(relative_attention=False, pos_att_type="p2c|c2p"),
    "c2p_only": dict(RELATIVE, pos_att_type="c2p"),
    "p2c_only_shared_key": dict(RELATIVE, pos_att_type="p2c", share_att_key=True),
    "c2p_p2c_p2p": dict(RELATIVE, pos_att_type="c2p|p2c|p2p"),
    "unknown_and_upper_case_entries": dict(RELATIVE, pos_att_type=["C2P", "p2c", "x2y"]),
    "buckets_off_zero": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=0,
                             max_relative_positions=24),
    "buckets_off_default_span": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=-1,
                                     max_relative_positions=-1),
    "buckets_default_span": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=16,
                                 max_relative_positions=-1, norm_rel_ebd="layer_norm"),
    "norm_rel_ebd_none_conv_tanh": dict(RELATIVE, pos_att_type="p2c|c2p", norm_rel_ebd="none", conv_kernel_size=3),
    "conv_gelu_5_groups_2": dict(RELATIVE, pos_att_type="c2p", conv_kernel_size=5, conv_act="gelu", conv_groups=2),
    "embedding_projection": dict(RELATIVE, pos_att_type="p2c|c2p", embedding_size=24, position_biased_input=True),
    "head_size_from_config": dict(RELATIVE, pos_att_type="p2c|c2p", attention_head_size=8, share_att_key=True),
}


def _config(name: str) -> DebertaV2Config:
    return DebertaV2Config(**{**BASE, **CONFIGS[name]})


def _inputs(config):
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, config.vocab_size, (3, 45), generator=generator)
    mask = torch.ones(3, 45, dtype=torch.long)
    mask[1, 30:] = 0
    mask[2, :7] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_runs_with_transformers_meaning(name):
    config = _config(name)
    torch.manual_seed(0)
    reference = perturb_(hf.DebertaV2ForTokenClassification(config)).eval()
    torch.manual_seed(0)
    fast = perturb_(deberta_fast.DebertaV2ForTokenClassification(config)).eval()
    patched = deberta_fast.patch_deberta(copy.deepcopy(reference))
    inputs = _inputs(config)
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=True, output_hidden_states=True)
        for model in (fast, patched):
            got = model(**inputs, output_attentions=True, output_hidden_states=True)
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
            for ours, theirs in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(**inputs).logits, expected.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, terms", [("tester_none_string", None), ("relative_none_string", None),
                                         ("relative_null", None), ("c2p_only", (True, False)),
                                         ("unknown_and_upper_case_entries", (False, True)),
                                         ("c2p_p2c_p2p", (True, True))])
def test_position_terms_read_as_transformers_reads_them(name, terms):
    attention = deberta_fast.DebertaV2Model(_config(name)).encoder.layer[0].attention.self
    spec = attention.position_spec
    assert (None if spec is None else (spec.c2p, spec.p2c)) == terms


def _module_classes(model):
    return {name: type(module) for name, module in model.named_modules()}


def _refuse_and_check_unchanged(model, error, match):
    inputs = _inputs(model.config)
    classes = _module_classes(model)
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(error, match=match):
        deberta_fast.patch_deberta(model)
    assert _module_classes(model) == classes
    assert not any(isinstance(m, DisentangledSelfAttention) for m in model.modules())
    assert not any(hasattr(m, "position_spec") for m in model.modules())
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, before)  # exact: the very same transformers modules run on the same tensors


def test_refused_config_leaves_the_model_as_it_was():
    config = DebertaV2Config(**{**BASE, "relative_attention": True, "pos_att_type": "p2c|c2p",
                                "position_buckets": 64, "max_relative_positions": 20})
    torch.manual_seed(0)
    _refuse_and_check_unchanged(hf.DebertaV2ForTokenClassification(config).eval(), ValueError,
                                "patch_deberta: deberta.encoder.layer.0.attention.self: position_buckets")


def test_refusal_in_a_later_layer_switches_no_earlier_module():
    torch.manual_seed(0)
    model = hf.DebertaV2ForTokenClassification(_config("c2p_only")).eval()
    last = model.deberta.encoder.layer[-1].attention.self
    last.position_buckets, last.max_relative_positions = 64, 20  # only the last layer cannot be served
    _refuse_and_check_unchanged(model, ValueError, "layer.1.attention.self: position_buckets")


def test_unknown_subclass_in_a_later_layer_switches_no_earlier_module():
    class OtherAttention(hf.DisentangledSelfAttention):
        pass

    torch.manual_seed(0)
    model = hf.DebertaV2ForTokenClassification(_config("c2p_only")).eval()
    model.deberta.encoder.layer[-1].attention.self.__class__ = OtherAttention
    _refuse_and_check_unchanged(model, TypeError, "subclass of transformers' DisentangledSelfAttention")


def test_fast_attention_from_refuses_before_switching():
    from deberta_fast.models import fast_attention_from

    module = hf.DisentangledSelfAttention(DebertaV2Config(**{**BASE, "relative_attention": True,
                                                             "pos_att_type": "c2p", "position_buckets": 64,
                                                             "max_relative_positions": 20}))
    with pytest.raises(ValueError, match="position_buckets"):
        fast_attention_from(module)
    assert type(module) is hf.DisentangledSelfAttention
