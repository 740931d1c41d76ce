"""Training converges exactly like transformers: same initial weights, 20 AdamW steps, dropout off, fp32."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.training.data import bundled_path, read_labelled
from deberta_fast.training.default_model import default_config
from deberta_fast.training.tokenizer import default_tokenizer

STEPS = 20


@pytest.fixture(scope="module")
def batches():
    """20 batches of 16 bundled reviews, tokenized with the default tokenizer."""
    tokenizer = default_tokenizer()
    data = read_labelled(bundled_path("train.jsonl"))
    order = list(range(len(data.texts)))
    random.Random(0).shuffle(order)
    out = []
    for step in range(STEPS):
        rows = order[step * 16:(step + 1) * 16]
        encoded = tokenizer([data.texts[i] for i in rows], padding=True, truncation=True, max_length=48,
                            return_tensors="pt")
        labels = torch.tensor([int(data.labels[i] == "fresh") for i in rows])
        out.append((encoded["input_ids"], encoded["attention_mask"], labels))
    return tokenizer, out


def _losses(model, batches):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    losses = []
    for input_ids, mask, labels in batches:
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_full_fine_tuning_losses_match_transformers(batches):
    tokenizer, data = batches
    config = default_config(len(tokenizer))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.num_labels = 2
    torch.manual_seed(0)
    reference = hf.DebertaV2ForSequenceClassification(config)
    fast = deberta_fast.DebertaV2ForSequenceClassification(config)
    fast.load_state_dict(reference.state_dict())
    with deberta_fast.use_backend("reference"):
        got = _losses(fast, data)
    expected = _losses(reference, data)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: transformers {a:.6f}, deberta_fast {b:.6f}"
    assert max(expected) - min(expected) > 1e-3, "the steps did not change the model"
