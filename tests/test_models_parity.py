"""deberta_fast's DeBERTa-v2 classes against transformers' on the reference backend.

Weights: seeded random, perturbed, saved by transformers and loaded by deberta_fast. Tolerances (DESIGN §5):
fp32 hidden states and logits within 1e-5 on every position, padded ones too; gradients within 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.ops.dispatch import use_backend
from configs import CONFIGS, MASKS, make_config, make_mask, transformers_and_fast

LENGTHS = (1, 7, 64, 65, 129, 300)
BATCH = 3
ATOL = 1e-5


def _inputs(config, length, mask_kind, batch=BATCH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator)
    mask = make_mask(mask_kind, batch, length)
    kwargs = {"input_ids": input_ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if config.type_vocab_size > 0:
        kwargs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (batch, length), generator=generator)
    return kwargs


@pytest.fixture(scope="module")
def base_pairs():
    """config name -> (transformers DebertaV2Model, deberta_fast DebertaV2Model) with the same weights."""
    return {name: transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, make_config(name))
            for name in CONFIGS}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_hidden_states_match_transformers(base_pairs, config_name, length):
    reference, fast = base_pairs[config_name]
    for mask_kind in MASKS:
        inputs = _inputs(reference.config, length, mask_kind)
        with torch.no_grad():
            expected = reference(**inputs, output_hidden_states=True)
            got = fast(**inputs, output_hidden_states=True)
        for layer, (a, b) in enumerate(zip(expected.hidden_states, got.hidden_states)):
            diff = (a - b).abs().max().item()
            assert diff <= ATOL, f"{config_name} L={length} mask={mask_kind} layer {layer}: max |diff| = {diff:.3g}"


@pytest.mark.parametrize("config_name", ["v3", "small_buckets", "absolute"])
def test_attention_probabilities_match_transformers(base_pairs, config_name):
    reference, fast = base_pairs[config_name]
    inputs = _inputs(reference.config, 65, "left")
    with torch.no_grad():
        expected = reference(**inputs, output_attentions=True).attentions
        got = fast(**inputs, output_attentions=True).attentions
    assert len(expected) == len(got) == reference.config.num_hidden_layers
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-6


def _relative_grad_error(expected: torch.Tensor, got: torch.Tensor, scale: float) -> float:
    """||got - expected|| / max(||expected||, 1e-3 · scale), scale = the largest gradient norm of the model.

    The floor matters only for gradients that are zero in exact arithmetic (the key bias: softmax ignores a
    per-row constant), which are rounding noise on both sides.
    """
    return ((expected - got).norm() / expected.norm().clamp_min(1e-3 * scale)).item()


def assert_gradients_match(reference: torch.nn.Module, fast: torch.nn.Module, label: str) -> int:
    expected = dict(reference.named_parameters())
    scale = max(p.grad.norm().item() for p in reference.parameters() if p.grad is not None)
    checked = 0
    for name, param in fast.named_parameters():
        ref_grad = expected[name].grad
        if ref_grad is None:
            assert param.grad is None or param.grad.abs().max() == 0, f"{label} {name}: unexpected gradient"
            continue
        assert param.grad is not None, f"{label} {name}: no gradient in deberta_fast"
        error = _relative_grad_error(ref_grad, param.grad, scale)
        assert error <= 1e-4, f"{label} {name}: relative gradient error {error:.3g}"
        checked += 1
    return checked


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_parameter_gradients_match_transformers(base_pairs, config_name):
    reference, fast = base_pairs[config_name]
    inputs = _inputs(reference.config, 65, "holes")
    weights = torch.randn(BATCH, 65, reference.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for model in (reference, fast):
        model.zero_grad()
        (model(**inputs).last_hidden_state * weights).sum().backward()
    assert assert_gradients_match(reference, fast, config_name) > 10


HEADS = {
    "masked_lm": (hf.DebertaV2ForMaskedLM, "DebertaV2ForMaskedLM", {}),
    "masked_lm_new": (hf.DebertaV2ForMaskedLM, "DebertaV2ForMaskedLM", {"legacy": False}),
    "sequence": (hf.DebertaV2ForSequenceClassification, "DebertaV2ForSequenceClassification", {"num_labels": 3}),
    "token": (hf.DebertaV2ForTokenClassification, "DebertaV2ForTokenClassification", {"num_labels": 5}),
    "qa": (hf.DebertaV2ForQuestionAnswering, "DebertaV2ForQuestionAnswering", {}),
    "choice": (hf.DebertaV2ForMultipleChoice, "DebertaV2ForMultipleChoice", {}),
}


def _head_labels(head, config, batch, length):
    generator = torch.Generator().manual_seed(9)
    if head.startswith("masked_lm"):
        return {"labels": torch.randint(0, config.vocab_size, (batch, length), generator=generator)}
    if head == "sequence":
        return {"labels": torch.randint(0, 3, (batch,), generator=generator)}
    if head == "token":
        return {"labels": torch.randint(0, 5, (batch, length), generator=generator)}
    if head == "qa":
        return {"start_positions": torch.tensor([1, 3, 0]), "end_positions": torch.tensor([2, 5, 4])}
    return {"labels": torch.tensor([1, 0, 1])}


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("config_name", ["v3", "v2_xlarge"])
def test_head_classes_match_transformers(head, config_name):
    hf_class, fast_name, extra = HEADS[head]
    config = make_config(config_name, **extra)
    reference, fast = transformers_and_fast(hf_class, getattr(deberta_fast, fast_name), config)
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in fast.named_parameters()]
    length = 33
    if head == "choice":  # [B, num_choices, L]
        inputs = {k: v.view(BATCH, 2, length) for k, v in _inputs(config, length, "right", batch=2 * BATCH).items()}
    else:
        inputs = _inputs(config, length, "right")
    inputs.update(_head_labels(head, config, BATCH, length))
    expected, got = reference(**inputs), fast(**inputs)
    for key in ("logits", "start_logits", "end_logits", "loss"):
        if key in expected:
            diff = (expected[key] - got[key]).abs().max().item()
            assert diff <= ATOL, f"{head}/{config_name} {key}: max |diff| {diff:.3g}"
    expected.loss.backward()
    got.loss.backward()
    assert_gradients_match(reference, fast, f"{head}/{config_name}")


def test_training_mode_dropout_matches_transformers_with_the_same_seed():
    """Attention-probability and position dropout draw the same masks as transformers from the same seed on the
    reference backend (the native CPU op and the Triton kernels use their own counter-based stream)."""
    config = make_config("v3", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    reference.train()
    fast.train()
    inputs = _inputs(config, 40, "right")
    torch.manual_seed(123)
    expected = reference(**inputs).last_hidden_state
    with use_backend("reference"):
        torch.manual_seed(123)
        got = fast(**inputs).last_hidden_state
        torch.manual_seed(124)
        other_seed = fast(**inputs).last_hidden_state
    assert (expected - got).abs().max().item() <= ATOL
    assert (got - other_seed).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_error_budget(base_pairs, dtype):
    """|ours - fp64| <= 2 |transformers - fp64| + floor, on the valid positions, in fp16 and bf16."""
    reference, fast = base_pairs["v3"]
    inputs = _inputs(reference.config, 65, "right")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        exact = reference.double()(**inputs).last_hidden_state
        reference.to(dtype)
        fast.to(dtype)
        try:
            hf_error = (reference(**inputs).last_hidden_state.double() - exact)[valid].abs().max().item()
            our_error = (fast(**inputs).last_hidden_state.double() - exact)[valid].abs().max().item()
        finally:
            reference.float()
            fast.float()
    floor = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert our_error <= 2 * hf_error + floor, f"{dtype}: ours {our_error:.3g}, transformers {hf_error:.3g}"


def test_pair_masks_equal_token_mask(base_pairs):
    """[B, L, L] and [B, 1, L, L] masks (transformers' encoder accepts them) give the token mask's results."""
    reference, fast = base_pairs["small_buckets"]
    inputs = _inputs(reference.config, 30, "left")
    mask = inputs["attention_mask"]
    pair = mask[:, None, :] * mask[:, :, None]
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
        for dense in (pair, pair[:, None]):
            got = fast(**{**inputs, "attention_mask": dense}).last_hidden_state
            assert (expected - got).abs().max().item() <= ATOL


def test_gradient_checkpointing_gives_the_same_gradients():
    config = make_config("v2_xlarge")
    _, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    fast.train()
    inputs = _inputs(config, 20, "right")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast.zero_grad()
        fast(**inputs).last_hidden_state.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in fast.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
