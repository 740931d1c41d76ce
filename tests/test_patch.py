"""patch_deberta: an existing transformers model switched to deberta_fast's attention in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, DebertaConfig, DebertaModel
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.models import DisentangledSelfAttention
from configs import make_config, perturb_


def _model(cls=hf.DebertaV2ForTokenClassification, name="small_buckets"):
    torch.manual_seed(0)
    return perturb_(cls(make_config(name, num_labels=4))).eval()


def _inputs():
    input_ids = torch.randint(1, 97, (3, 50))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, :20] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("cls", [hf.DebertaV2Model, hf.DebertaV2ForTokenClassification, hf.DebertaV2ForMaskedLM])
def test_patched_model_gives_the_same_outputs(cls):
    model = _model(cls)
    inputs = _inputs()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs)[0]
        returned = deberta_fast.patch_deberta(model)
        got = model(**inputs)[0]
    assert returned is model
    assert all(isinstance(m.attention.self, DisentangledSelfAttention) for m in model.base_model.encoder.layer)
    assert (expected - got).abs().max().item() <= 1e-5
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key]), key  # exact: patching never touches a parameter


def test_patch_is_idempotent_and_keeps_parameters():
    model = _model()
    params = [id(p) for p in model.parameters()]
    deberta_fast.patch_deberta(model)
    deberta_fast.patch_deberta(model)
    assert [id(p) for p in model.parameters()] == params


class _ThirdPartyTagger(nn.Module):
    """A model of someone else's that holds a DeBERTa-v2 encoder, as GLiNER-style models do."""

    def __init__(self):
        super().__init__()
        self.encoder = hf.DebertaV2Model(make_config("v3"))
        self.proj = nn.Linear(32, 2)

    def forward(self, **inputs):
        return self.proj(self.encoder(**inputs).last_hidden_state)


def test_third_party_model_containing_deberta_is_patched():
    torch.manual_seed(0)
    model = perturb_(_ThirdPartyTagger()).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs)
        got = deberta_fast.patch_deberta(model)(**inputs)
    assert (expected - got).abs().max().item() <= 1e-5


def test_patch_refuses_models_without_deberta_v2():
    with pytest.raises(TypeError, match="contains no DeBERTa-v2 attention"):
        deberta_fast.patch_deberta(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=8, vocab_size=50)))
    v1 = DebertaModel(DebertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                    vocab_size=50))
    with pytest.raises(TypeError, match="DeBERTa v1 is not supported"):
        deberta_fast.patch_deberta(v1)
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        deberta_fast.patch_deberta("model")


def test_patch_refuses_unknown_subclasses():
    class CustomAttention(hf.DisentangledSelfAttention):
        def forward(self, *args, **kwargs):  # pragma: no cover - never run
            raise AssertionError

    model = _model()
    layer = model.deberta.encoder.layer[0].attention
    layer.self.__class__ = CustomAttention
    with pytest.raises(TypeError, match="subclass of transformers' DisentangledSelfAttention"):
        deberta_fast.patch_deberta(model)


def test_set_attention_backend_pins_every_layer():
    model = deberta_fast.patch_deberta(_model())
    deberta_fast.set_attention_backend(model, "reference")
    assert {m.backend for m in model.modules() if isinstance(m, DisentangledSelfAttention)} == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        deberta_fast.set_attention_backend(model, "fastest")
