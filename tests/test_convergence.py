"""Training converges exactly like transformers: same initial weights, 20 AdamW steps, dropout off, fp32."""

from __future__ import annotations

import os
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


class _LoRAAsAdapterHubComputes(torch.nn.Module):
    """y = W x + b + (alpha / r) · (x Aᵀ) Bᵀ around a transformers Linear (AdapterHub's LoRA, no dropout)."""

    def __init__(self, base: torch.nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(lora_A.detach().clone())
        self.lora_B = torch.nn.Parameter(lora_B.detach().clone())
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def test_lora_training_losses_match_adapterhub_math():
    """deberta_fast's adapter model vs LoRA + AdapterHub's classification head written out on transformers'
    DebertaV2Model (the fixture base model; with share_att_key, query_proj / key_proj wrapped also act on the
    relative embeddings, as in AdapterHub): 20 AdamW steps, dropout off, per-step losses within 1e-4 relative."""
    import copy
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from adapters_helpers import FIXTURES, fixture_config, fixture_model

    if not os.path.isdir(FIXTURES):
        pytest.skip(f"AdapterHub fixtures not found at {FIXTURES}")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ours = fixture_model()
    ours.add_adapter("lo", config="lora[r=4, alpha=8, attn_matrices=['q','k','v'], intermediate_lora=True, "
                                  "output_lora=True]")
    ours.add_classification_head("lo", num_labels=3)
    with torch.no_grad():  # LoRA B starts at zero: draw both so that every path matters from step one
        for name, param in ours.named_parameters():
            if ".loras.lo." in name:
                param.normal_(0, 0.2)
    ours.train_adapter("lo")
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    config = copy.deepcopy(fixture_config())
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    reference = hf.DebertaV2Model(config)
    reference.load_state_dict(load_file(os.path.join(FIXTURES, "base", "model.safetensors")))
    reference.requires_grad_(False)
    wrapped = []
    for index, layer in enumerate(reference.encoder.layer):
        targets = {"attention.self.query_proj": layer.attention.self, "attention.self.key_proj": layer.attention.self,
                   "attention.self.value_proj": layer.attention.self, "intermediate.dense": layer.intermediate,
                   "output.dense": layer.output}
        for path, parent in targets.items():
            attribute = path.rsplit(".", 1)[1]
            prefix = f"deberta.encoder.layer.{index}.{path}.loras.lo."
            ours_params = dict(ours.named_parameters())
            module = _LoRAAsAdapterHubComputes(getattr(parent, attribute), ours_params[prefix + "lora_A"],
                                               ours_params[prefix + "lora_B"], scaling=8 / 4)
            setattr(parent, attribute, module)
            wrapped.append(module)
    head = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Dropout(0.0), torch.nn.Linear(64, 3))
    head.load_state_dict({k.split("heads.lo.", 1)[1]: v for k, v in ours.state_dict().items()
                          if k.startswith("heads.lo.")})
    reference_params = [p for m in wrapped for p in (m.lora_A, m.lora_B)] + list(head.parameters())
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in reference_params) == sum(p.numel() for p in ours_params)

    generator = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(1, 256, (4, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0
        mask[3, :5] = 0
        batches.append((ids, mask, torch.randint(0, 3, (4,), generator=generator)))

    def reference_loss(ids, mask, labels):
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)

    def ours_loss(ids, mask, labels):
        return ours(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = []
    for params, loss_fn in ((reference_params, reference_loss), (ours_params, ours_loss)):
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        run = []
        for ids, mask, labels in batches:
            loss = loss_fn(ids, mask, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    for step, (a, b) in enumerate(zip(*losses)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: AdapterHub math {a:.6f}, deberta_fast {b:.6f}"
    assert max(losses[0]) - min(losses[0]) > 1e-2
