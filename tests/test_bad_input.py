"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import deberta_fast
from deberta_fast.ops import RelativePositionSpec, disentangled_attention
from configs import make_config


@pytest.fixture(scope="module")
def model():
    return deberta_fast.DebertaV2Model(make_config("absolute", max_position_embeddings=64)).eval()


def test_mask_and_input_ids_disagree(model):
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\] = \[2, 10\]"):
        model(torch.ones(2, 10, dtype=torch.long), attention_mask=torch.ones(2, 9))


@pytest.mark.parametrize("shape", [(2,), (2, 10, 1), (2, 2, 10, 10), (1, 1, 1, 10, 10)])
def test_mask_of_wrong_rank(model, shape):
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.ones(2, 10, dtype=torch.long), attention_mask=torch.ones(shape))


def test_both_input_ids_and_inputs_embeds(model):
    with pytest.raises(ValueError, match="both input_ids and inputs_embeds"):
        model(torch.ones(2, 10, dtype=torch.long), inputs_embeds=torch.zeros(2, 10, 32))


def test_neither_input_ids_nor_inputs_embeds(model):
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds"):
        model()


def test_input_ids_of_wrong_rank(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]"):
        model(torch.ones(10, dtype=torch.long))


def test_sequence_longer_than_absolute_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_longer_sequences_are_fine_without_absolute_positions():
    model = deberta_fast.DebertaV2Model(make_config("c2p_only", max_position_embeddings=64)).eval()
    with torch.no_grad():
        assert model(torch.ones(1, 100, dtype=torch.long)).last_hidden_state.shape == (1, 100, 32)


def test_token_type_ids_of_wrong_shape(model):
    with pytest.raises(ValueError, match="token_type_ids must be"):
        model(torch.ones(2, 10, dtype=torch.long), token_type_ids=torch.zeros(2, 11, dtype=torch.long))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of auto, reference, triton, cpu; got 'cuda'"):
        with deberta_fast.use_backend("cuda"):
            pass


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("DEBERTA_FAST_BACKEND", "fast")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="environment variable DEBERTA_FAST_BACKEND must be one of"):
        disentangled_attention(q, q, q, spec=None, softmax_scale=1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position_buckets=64, max_relative_positions=20), "position_buckets and max_relative_positions"),
        # log((max_relative_positions - 1) / (buckets // 2)) = log(1): transformers divides by zero there
        (dict(position_buckets=32, max_relative_positions=17), "position_buckets and max_relative_positions"),
    ],
)
def test_configs_the_op_cannot_serve(overrides, message):
    with pytest.raises(ValueError, match=message):
        deberta_fast.DebertaV2Model(make_config("c2p_only", **overrides))


def test_op_rejects_mismatched_tables():
    spec = RelativePositionSpec(c2p=True, p2c=False, position_buckets=8, max_relative_positions=32)
    q = torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match="pos_key is required"):
        disentangled_attention(q, q, q, spec=spec, softmax_scale=0.5)
    with pytest.raises(ValueError, match=r"pos_key must have shape \[1 or 2, 2, 16, 4\]"):
        disentangled_attention(q, q, q, torch.randn(1, 2, 15, 4), spec=spec, softmax_scale=0.5)
    with pytest.raises(ValueError, match="key must have shape"):
        disentangled_attention(q, q[:, :, :4], q, torch.randn(1, 2, 16, 4), spec=spec, softmax_scale=0.5)
    with pytest.raises(ValueError, match="value must have the dtype"):
        disentangled_attention(q, q, q.double(), torch.randn(1, 2, 16, 4), spec=spec, softmax_scale=0.5)
    with pytest.raises(ValueError, match="query must be a 4-D tensor"):
        disentangled_attention(q[0], q, q, spec=None, softmax_scale=0.5)
