"""Unpadded eval-mode execution of padded batches (deberta_fast.models.unpadded) against transformers.

Every position is compared, padded ones included: transformers gives them a uniform attention row over the whole
padded row, which the unpadded pass reproduces from one representative token per row.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.models import unpadded
from configs import make_config, transformers_and_fast

ATOL = 1e-5
BATCH, LENGTH = 4, 37


def padded_mask(kind: str) -> torch.Tensor:
    """[BATCH, LENGTH]: right / left padding of different lengths, an all-padded row, or holes."""
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if kind == "right":
        mask[1, 30:] = 0
        mask[2, 5:] = 0
        mask[3, 1:] = 0
    elif kind == "left":
        mask[1, :7] = 0
        mask[2, :LENGTH - 1] = 0
        mask[3, :20] = 0
    elif kind == "all_padded_row":
        mask[1, 10:] = 0
        mask[2] = 0
    elif kind == "holes":
        mask[1, 3:9] = 0
        mask[2, 20:] = 0
    else:
        raise ValueError(kind)
    return mask


def inputs_for(config, kind, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (BATCH, LENGTH), generator=generator)
    mask = padded_mask(kind)
    input_ids[mask == 0] = 0
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    if config.type_vocab_size > 0:
        kwargs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (BATCH, LENGTH), generator=generator)
    return kwargs


@pytest.fixture
def count_unpadded(monkeypatch):
    calls = []
    original = unpadded.unpadded_encoder_layers

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("deberta_fast.models.encoder.unpadded_encoder_layers", counting)
    return calls


def set_threshold(model, value):
    for module in model.modules():
        if isinstance(module, deberta_fast.models.encoder.DebertaV2Encoder):
            module.unpad_threshold = value


@pytest.mark.parametrize("kind", ["right", "left", "all_padded_row"])
@pytest.mark.parametrize("config_name", ["v3", "c2p_only", "p2c_only", "absolute", "unbucketed", "odd_head_dim"])
def test_unpadded_hidden_states_match_transformers_everywhere(config_name, kind, count_unpadded):
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, make_config(config_name))
    set_threshold(fast, 0.0)
    inputs = inputs_for(reference.config, kind)
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)
        got = fast(**inputs, output_hidden_states=True)
    assert count_unpadded, "the unpadded pass did not run"
    assert len(expected.hidden_states) == len(got.hidden_states)
    for layer, (a, b) in enumerate(zip(expected.hidden_states, got.hidden_states)):
        diff = (a - b).abs().max().item()
        assert diff <= ATOL, f"{config_name} {kind} layer {layer}: max |diff| {diff:.3g}"


def test_holes_stay_padded_and_match(count_unpadded):
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, make_config("v3"))
    set_threshold(fast, 0.0)
    inputs = inputs_for(reference.config, "holes")
    with torch.no_grad():
        diff = (reference(**inputs).last_hidden_state - fast(**inputs).last_hidden_state).abs().max().item()
    assert not count_unpadded
    assert diff <= ATOL


@pytest.mark.parametrize("guard", ["train", "compiling", "conv", "threshold", "output_attentions"])
def test_unpadding_is_skipped_where_it_does_not_hold(guard, count_unpadded, monkeypatch):
    name = "v2_xlarge" if guard == "conv" else "v3"
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, make_config(name))
    set_threshold(fast, 0.9 if guard == "threshold" else 0.0)
    if guard == "train":
        fast.train()  # dropout probabilities are 0 in these configs, so outputs still match
    if guard == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inputs = inputs_for(reference.config, "right")
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=guard == "output_attentions").last_hidden_state
        got = fast(**inputs, output_attentions=guard == "output_attentions").last_hidden_state
    assert not count_unpadded
    assert (expected - got).abs().max().item() <= ATOL


HEADS = {
    "sequence": (hf.DebertaV2ForSequenceClassification, "DebertaV2ForSequenceClassification", {"num_labels": 3}),
    "token": (hf.DebertaV2ForTokenClassification, "DebertaV2ForTokenClassification", {"num_labels": 5}),
    "mlm": (hf.DebertaV2ForMaskedLM, "DebertaV2ForMaskedLM", {}),
    "qa": (hf.DebertaV2ForQuestionAnswering, "DebertaV2ForQuestionAnswering", {}),
    "choice": (hf.DebertaV2ForMultipleChoice, "DebertaV2ForMultipleChoice", {}),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_unpadded_head_outputs_and_gradients_match_transformers(head, count_unpadded):
    hf_class, fast_name, extra = HEADS[head]
    config = make_config("v3", **extra)
    reference, fast = transformers_and_fast(hf_class, getattr(deberta_fast, fast_name), config)
    set_threshold(fast, 0.0)
    inputs = inputs_for(config, "right")
    if head == "choice":
        inputs = {k: v.view(BATCH // 2, 2, LENGTH) for k, v in inputs.items()}
    expected, got = reference(**inputs), fast(**inputs)
    assert count_unpadded
    key = "start_logits" if head == "qa" else "logits"
    assert (expected[key] - got[key]).abs().max().item() <= ATOL
    expected[key].square().sum().backward()
    got[key].square().sum().backward()
    fast_params = dict(fast.named_parameters())
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert fast_params[name].grad is None or not fast_params[name].grad.any(), name
            continue
        diff = (param.grad - fast_params[name].grad).abs().max().item()
        assert diff <= 1e-4 * max(1.0, param.grad.abs().max().item()), f"{head} grad {name}: {diff:.3g}"
