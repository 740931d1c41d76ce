"""Switchable input embeddings (AdapterHub's embeddings API): ``add_embeddings``, ``load_embeddings``,
``save_embeddings``, ``set_active_embeddings``, ``delete_embeddings``, ``active_embeddings``, ``loaded_embeddings``.

The embeddings are kept on the base model (``model.base_model.loaded_embeddings``: {name: nn.Embedding}, a plain
dict, as in AdapterHub, so only the active embedding is in the state dict, as ``embeddings.word_embeddings``).
"default" is the model's own word embedding. Activating an embedding makes it the model's input embedding and sets
``config.vocab_size`` to its number of rows (AdapterHub's behaviour; a masked-LM head keeps its decoder size).

Files (AdapterHub's names): ``<dir>/embedding.pt`` (``torch.save`` of the [V, E] weight, read with
``weights_only=True``) and, when a tokenizer is given, ``<dir>/tokenizer/`` (``save_pretrained``).
New embeddings start from N(0, 0.02) (the base model's initialisation), frozen; with a reference embedding and
its tokenizer, rows of tokens the two vocabularies share are copied from the reference.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from .persistence import files

logger = logging.getLogger("deberta_fast")

__all__ = ["EMBEDDING_FILE", "EmbeddingsMixin", "TOKENIZER_PATH"]

EMBEDDING_FILE = "embedding.pt"
TOKENIZER_PATH = "tokenizer"


class EmbeddingsMixin:
    """The embeddings API on a model whose ``base_model`` is the DeBERTa encoder (see module docstring)."""

    def _embedding_state(self) -> dict:
        base = self.base_model
        state = base.__dict__.get("_embedding_state")
        if state is None:
            state = {"loaded": {"default": self.get_input_embeddings()}, "active": "default"}
            base.__dict__["_embedding_state"] = state
        return state

    @property
    def loaded_embeddings(self) -> dict:
        """{name: nn.Embedding} of every embedding known to the model (the active one included)."""
        return self._embedding_state()["loaded"]

    @property
    def active_embeddings(self) -> str:
        return self._embedding_state()["active"]

    def _require_new_embedding_name(self, name) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        if name in self.loaded_embeddings:
            raise ValueError(f"An embedding with the name {name} already exists")

    def add_embeddings(self, name: str, tokenizer, reference_embedding: str | None = None, reference_tokenizer=None,
                       embedding_dim: int | None = None) -> None:
        """Add embedding ``name`` with ``len(tokenizer)`` rows and make it active (module docstring)."""
        self._require_new_embedding_name(name)
        if (reference_embedding is None) != (reference_tokenizer is None):
            raise KeyError("Reference embedding and reference tokenizer are required to use initialize embeddings "
                           "from reference embedding")
        if reference_embedding is not None and reference_embedding not in self.loaded_embeddings:
            raise ValueError(f"reference_embedding {reference_embedding!r} is not loaded; loaded embeddings: "
                             f"{list(self.loaded_embeddings)}")
        size = embedding_dim or getattr(self.config, "embedding_size", None) or self.config.hidden_size
        current = self.get_input_embeddings().weight
        embedding = nn.Embedding(len(tokenizer), size, device=current.device, dtype=current.dtype)
        with torch.no_grad():
            embedding.weight.normal_(0.0, 0.02)
            if reference_embedding is not None:
                reference = self.loaded_embeddings[reference_embedding].weight
                reference_vocab = reference_tokenizer.get_vocab()
                vocab = tokenizer.get_vocab()
                for token in set(vocab) & set(reference_vocab):
                    embedding.weight[vocab[token]] = reference[reference_vocab[token]].to(embedding.weight)
        embedding.requires_grad_(False)
        embedding.train(False)
        self.loaded_embeddings[name] = embedding
        self.set_active_embeddings(name)

    def set_active_embeddings(self, name: str) -> None:
        """Make embedding ``name`` the model's input embedding."""
        if name not in self.loaded_embeddings:
            raise ValueError(f"No embedding with name {name}; loaded embeddings: {list(self.loaded_embeddings)}")
        state = self._embedding_state()
        # the active entry may have been replaced (resize_token_embeddings, set_input_embeddings)
        state["loaded"][state["active"]] = self.get_input_embeddings()
        embedding = state["loaded"][name]
        self.base_model.set_input_embeddings(embedding)
        self.config.vocab_size = embedding.num_embeddings
        state["active"] = name

    def delete_embeddings(self, name: str) -> None:
        """Forget embedding ``name``; deleting the active one activates "default" first."""
        if name not in self.loaded_embeddings:
            raise ValueError(f"No embedding with name {name}")
        if name == "default":
            raise ValueError("the default embedding cannot be deleted")
        if self.active_embeddings == name:
            logger.warning("The active embedding is deleted. Setting the default embedding as active.")
            self.set_active_embeddings("default")
        del self.loaded_embeddings[name]

    def save_embeddings(self, path: str, name: str, tokenizer=None) -> None:
        """Write embedding ``name`` to ``path``/embedding.pt (and the tokenizer to ``path``/tokenizer/)."""
        if name not in self.loaded_embeddings:
            raise ValueError(f"No embedding with name {name}; loaded embeddings: {list(self.loaded_embeddings)}")
        if self.active_embeddings == name:
            self.loaded_embeddings[name] = self.get_input_embeddings()
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path}: exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        with files.atomic_path(os.path.join(path, EMBEDDING_FILE)) as tmp:
            torch.save(self.loaded_embeddings[name].weight.detach().cpu(), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(path, TOKENIZER_PATH))

    def load_embeddings(self, path: str, name: str):
        """Load ``path``/embedding.pt as embedding ``name`` and activate it; returns the tokenizer saved with it
        (``path``/tokenizer/), else None."""
        self._require_new_embedding_name(name)
        embedding_path = os.path.join(path, EMBEDDING_FILE)
        if not os.path.isfile(embedding_path):
            raise FileNotFoundError(f"No embeddings found at {embedding_path}")
        weight = torch.load(embedding_path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ValueError(f"{embedding_path}: expected a [vocab, embedding_size] tensor")
        tokenizer = None
        tokenizer_path = os.path.join(path, TOKENIZER_PATH)
        if os.path.isdir(tokenizer_path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        current = self.get_input_embeddings().weight
        self.loaded_embeddings[name] = nn.Embedding.from_pretrained(weight.to(device=current.device,
                                                                              dtype=current.dtype))
        self.set_active_embeddings(name)
        return tokenizer
