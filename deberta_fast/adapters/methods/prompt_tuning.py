"""Prompt tuning (Lester et al., 2021) with AdapterHub's module, keys and placement.

``deberta.prompt_tuning.prompt_tunings.<n>.prompt_embedding.weight`` [P, E] (E = embedding_size or hidden_size).
The prompts are inserted into the embedding output *after* the embedding LayerNorm, padding mask and dropout
(they bypass them), for the first adapter of the active setup only (AdapterHub's rule):

    combine="prefix":           [prompt, x]                  [B, P + L, H]
    combine="prefix_after_bos": [x[:, :1], prompt, x[:, 1:]]

The mask gets P leading ones (for both combine modes, as AdapterHub), and everything downstream (attention,
relative positions over P + L tokens, the nGiE conv layer) sees the longer sequence. AdapterHub gives the conv layer
the original [B, L] mask and crashes whenever conv_kernel_size > 0; here it gets the extended token mask.
Attention follows AdapterHub's extended pair mask: the first P query rows see every key (padding included) and
every query sees the first P keys; other pairs need both tokens valid. With padding in the batch that is a
[B, 1, P + L, P + L] pair mask (``prompt_pair_mask``; the op's pair-mask path), without padding the token mask
gives the same result. Heads see [B, P + L, H]; the tagging and masked-LM heads pad their labels with -100 for the
prompt positions.

Initialisation: "random_uniform" U(-0.5, 0.5); "from_string": the word embeddings of ``prompt_init_text``
tokenised with the tokenizer at ``config.tokenizer_name_or_path`` (repeated / cut to P tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..configuration import PromptTuningConfig
from ..layer_base import AdapterLayerBase
from .initialization import seeded_generator

__all__ = ["PromptTuning", "PromptTuningLayer", "insert_prompt_mask", "prompt_pair_mask"]

RANDOM_UNIFORM_SCALE = 0.5


class PromptTuning(nn.Module):
    """One adapter's prompt: ``prompt_embedding`` Embedding(P, E) and the way it joins the input."""

    def __init__(self, name: str, config: PromptTuningConfig, model_config, word_embeddings: nn.Embedding):
        super().__init__()
        if config.combine not in ("prefix", "prefix_after_bos"):
            raise ValueError(f"Unknown combination function: {config.combine}. "
                             "Must be one of 'prefix' or 'prefix_after_bos'.")
        self.name = name
        self.combine = config.combine
        self.prompt_length = config.prompt_length
        embedding_size = getattr(model_config, "embedding_size", None) or model_config.hidden_size
        reference = word_embeddings.weight
        self.prompt_embedding = nn.Embedding(config.prompt_length, embedding_size, device=reference.device,
                                             dtype=reference.dtype)
        self._initialize(config, model_config, word_embeddings)

    @torch.no_grad()
    def _initialize(self, config, model_config, word_embeddings) -> None:
        weight = self.prompt_embedding.weight
        if weight.device.type == "meta":
            return
        if config.prompt_init == "random_uniform":
            generator = seeded_generator(config.init_weights_seed, weight.device)
            nn.init.uniform_(weight, -RANDOM_UNIFORM_SCALE, RANDOM_UNIFORM_SCALE, generator=generator)
        elif config.prompt_init == "from_string":
            if config.prompt_init_text is None:
                raise ValueError("Prompt text must be provided when using prompt_init='from_string'.")
            source = getattr(model_config, "tokenizer_name_or_path", None)
            if not source:
                raise ValueError("prompt_init='from_string' needs model.config.tokenizer_name_or_path (a local "
                                 "tokenizer directory or a Hub id) to tokenise prompt_init_text")
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(source)(config.prompt_init_text)["input_ids"]
            ids = (ids * (-(-self.prompt_length // len(ids))))[: self.prompt_length]
            weight.copy_(word_embeddings(torch.tensor(ids, device=weight.device)).to(weight.dtype))
        else:
            raise ValueError(f"Unknown prompt initialization: {config.prompt_init}")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, L, E] -> [B, P + L, E]."""
        prompt = self.prompt_embedding.weight.unsqueeze(0).expand(embeddings.shape[0], -1, -1)
        if self.combine == "prefix":
            return torch.cat([prompt, embeddings], dim=1)
        return torch.cat([embeddings[:, :1], prompt, embeddings[:, 1:]], dim=1)


def insert_prompt_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A [B, L] token mask or [B, 1, L, L] / [B, L, L] pair mask with ``length`` leading valid positions (pair
    masks: the new rows and columns are all ones)."""
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
    pairs = mask if mask.dim() == 3 else mask[:, 0]
    pairs = torch.cat([pairs.new_ones(pairs.shape[0], length, pairs.shape[2]), pairs], dim=1)
    pairs = torch.cat([pairs.new_ones(pairs.shape[0], pairs.shape[1], length), pairs], dim=2)
    return pairs if mask.dim() == 3 else pairs.unsqueeze(1)


def prompt_pair_mask(token_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, L', L'] bool: pair (i, j) is valid when i < length, j < length, or both tokens are valid
    (``token_mask`` [B, L'] already holds the ``length`` leading ones)."""
    valid = token_mask.bool()
    pairs = valid[:, :, None] & valid[:, None, :]
    pairs[:, :length, :] = True
    pairs[:, :, :length] = True
    return pairs.unsqueeze(1)


class PromptTuningLayer(AdapterLayerBase, nn.Module):
    """``deberta.prompt_tuning``: the prompts of every prompt-tuning adapter (layer index -1)."""

    adapter_modules_name = "prompt_tunings"

    def __init__(self, registry, model_config, get_word_embeddings):
        super().__init__()
        self._init_adapter_layer(registry, -1, "prompt")
        # the base model's word embeddings, looked up when a prompt is added (they may be resized or replaced)
        object.__setattr__(self, "_get_word_embeddings", get_word_embeddings)
        object.__setattr__(self, "_model_config", model_config)
        self.prompt_tunings = nn.ModuleDict()

    def add_adapter(self, name: str, layer_idx: int) -> bool:
        config = self._registry.match(name, PromptTuningConfig)
        if config is None:
            return False
        module = PromptTuning(name, config, self._model_config, self._get_word_embeddings())
        module.train(self.training)
        self.prompt_tunings[name] = module
        return True

    def forward(self, embeddings: torch.Tensor):
        """-> (embeddings with the prompt of the setup's first adapter, that prompt's module or None)."""
        setup = self.active_setup()
        if setup is None:
            return embeddings, None
        first = setup.first()
        if first not in self.prompt_tunings:
            return embeddings, None
        module = self.prompt_tunings[first]
        return module(embeddings), module
