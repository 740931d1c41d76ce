"""A short masked-LM warm-up of a base model on a text corpus (BERT's 80/10/10 masking of 15% of tokens)."""

from __future__ import annotations

import random

import torch

from ..models.embedding import zero_grad


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, generator: torch.Generator,
                probability: float = 0.15):
    """(inputs, labels): 15% of the non-special tokens are predicted; of those 80% become [MASK], 10% a random
    token, 10% stay. labels is -100 where nothing is predicted."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    replace = chosen & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    inputs[replace] = tokenizer.mask_token_id
    randomise = chosen & ~replace & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    inputs[randomise] = torch.randint(5, len(tokenizer), input_ids.shape, generator=generator)[randomise]
    return inputs, labels


def masked_lm_warmup(base_model, config, tokenizer, corpus: list[str], steps: int, batch_size: int,
                     max_length: int, learning_rate: float, seed: int, progress=None) -> list[float]:
    """Train ``base_model`` (a deberta_fast DebertaV2Model) with a temporary masked-LM head for ``steps`` steps;
    returns the losses. The head is discarded: only the base model's weights are kept."""
    import deberta_fast

    mlm = deberta_fast.DebertaV2ForMaskedLM(config)
    mlm.deberta.load_state_dict(base_model.state_dict())
    mlm.train()
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=learning_rate, weight_decay=0.01)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        texts = [corpus[rng.randrange(len(corpus))] for _ in range(batch_size)]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            return_special_tokens_mask=True)
        special = encoded.pop("special_tokens_mask").bool()
        inputs, labels = mask_tokens(encoded["input_ids"], special, tokenizer, generator)
        loss = mlm(input_ids=inputs, attention_mask=encoded["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0)
        optimizer.step()
        zero_grad(mlm, optimizer)  # the word embedding's .grad is kept, zeroed in place
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, loss.item())
    base_model.load_state_dict(mlm.deberta.state_dict())
    return losses
