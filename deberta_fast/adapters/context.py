"""Which adapters run in a forward pass: the ``AdapterSetup`` context manager and the per-forward context.

Precedence (AdapterHub's): an enclosing ``with AdapterSetup(...)`` block, else the model's ``active_adapters``.
Contexts live in ``contextvars``, so they are per thread and per asyncio task, and nest.

``ForwardContext`` is created by ``DebertaV2AdapterModel.forward`` and read by the adapter layers during that pass:
it fixes the setup once per forward and carries the per-pass state composition blocks need (parallel replication,
task ids, gating scores and fusion attentions to return).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from .composition.blocks import AdapterCompositionBlock, parse_composition, parse_heads_from_composition

__all__ = ["AdapterSetup", "ForwardContext", "active_setup_for", "snapshot_contexts"]

_setups: contextvars.ContextVar[tuple] = contextvars.ContextVar("deberta_fast_adapter_setups", default=())
_forwards: contextvars.ContextVar[tuple] = contextvars.ContextVar("deberta_fast_forward_contexts", default=())


class _Stacks:
    # The context variables are read through C-level properties (ContextVar.get as fget): torch.compile evaluates
    # them while tracing and guards on the result, where a ContextVar.get() call breaks the graph. The property
    # passes the instance as get's default, which only applies when a variable was never set in this context.
    __slots__ = ()
    setups = property(_setups.get)
    forwards = property(_forwards.get)


_STACKS = _Stacks()


def _stack(value) -> tuple:
    return () if value is _STACKS else value


def _traced_forwards(registry) -> list:
    """While torch.compile / torch.export trace a forward, its ForwardContext is kept on the model's registry
    (ContextVar.set cannot be traced); only the tracing reads it, the compiled graph has the setup built in."""
    stack = getattr(registry, "_traced_forward_contexts", None)
    if stack is None:
        stack = []
        registry._traced_forward_contexts = stack
    return stack


class AdapterSetup:
    """``with AdapterSetup(Stack("a", "b"), head_setup="b"): model(**batch)`` runs that setup instead of the
    model's active adapters. ``head_setup`` defaults to the head named after the setup's last adapter.
    ``ignore_empty=True`` makes an empty setup (None) a no-op instead of "no adapters"."""

    def __init__(self, adapter_setup, head_setup=None, ignore_empty: bool = False):
        self.adapter_setup = parse_composition(adapter_setup)
        self.head_setup = head_setup or (
            parse_heads_from_composition(self.adapter_setup) if self.adapter_setup is not None else None
        )
        self._empty = ignore_empty and self.adapter_setup is None and self.head_setup is None
        self._tokens: list = []

    def __enter__(self):
        if not self._empty:
            self._tokens.append(_setups.set(_stack(_STACKS.setups) + (self,)))
        return self

    def __exit__(self, *exc):
        if not self._empty:
            _setups.reset(self._tokens.pop())
        return False

    @classmethod
    def get_context(cls) -> AdapterSetup | None:
        stack = _stack(_STACKS.setups)
        return stack[-1] if stack else None

    @classmethod
    def get_context_adapter_setup(cls) -> AdapterCompositionBlock | None:
        context = cls.get_context()
        return context.adapter_setup if context else None

    @classmethod
    def get_context_head_setup(cls):
        context = cls.get_context()
        return context.head_setup if context else None


@dataclass
class ForwardContext:
    """State of one forward pass of a DebertaV2AdapterModel (see module docstring).

    registry: the model's AdapterRegistry (identifies which model the context belongs to).
    adapter_setup: the setup of this pass (None: no adapters). skip_layers: layer indices that run no adapters.
    adapters_parallelized: the batch already holds one copy per Parallel channel (the base model replicates the
    inputs once, before the embeddings); original_batch_size is then the batch of one channel.
    prefix_states: {adapter name: per-layer (key, value) prefixes}, computed once per pass by the prefix pool.
    prompt_tokens_length: number of prompt positions prepended to the sequence (prompt tuning), else None;
    attention_pair_mask: the [B, 1, L, L] mask the attention layers use instead of the token mask (prompt tuning
    with padding).
    token_offsets / token_lengths: [B] first valid position and number of valid tokens (ReFT positions).
    adapter_gating_scores[adapter][layer][location] and adapter_fusion_attentions[fusion][layer][location]:
    numpy arrays collected when the matching ``output_*`` flag is set.
    """

    registry: Any
    adapter_setup: AdapterCompositionBlock | None
    skip_layers: tuple = ()
    output_adapter_gating_scores: bool = False
    output_adapter_fusion_attentions: bool = False
    adapter_input_parallelized: bool = False
    task_ids: Any = None
    adapters_parallelized: bool = False
    original_batch_size: int | None = None
    prefix_states: dict = field(default_factory=dict)
    prompt_tokens_length: int | None = None
    attention_pair_mask: Any = None
    token_offsets: Any = None
    token_lengths: Any = None
    adapter_gating_scores: dict = field(default_factory=lambda: defaultdict(dict))
    adapter_fusion_attentions: dict = field(default_factory=lambda: defaultdict(dict))

    def __enter__(self):
        if torch.compiler.is_compiling():
            _traced_forwards(self.registry).append(self)
        else:
            self._token = _forwards.set(_stack(_STACKS.forwards) + (self,))
        return self

    def __exit__(self, *exc):
        if torch.compiler.is_compiling():
            _traced_forwards(self.registry).pop()
        else:
            _forwards.reset(self._token)
        return False

    @classmethod
    def get_context(cls) -> ForwardContext | None:
        stack = _stack(_STACKS.forwards)
        return stack[-1] if stack else None

    @classmethod
    def for_registry(cls, registry) -> ForwardContext | None:
        """The innermost context of the model that owns ``registry`` (None outside its forward)."""
        if torch.compiler.is_compiling():
            traced = _traced_forwards(registry)
            if traced:
                return traced[-1]
        context = cls.get_context()
        return context if context is not None and context.registry is registry else None


def snapshot_contexts():
    """A context manager factory that re-enters the AdapterSetup and ForwardContext stacks active now (gradient
    checkpointing recomputes a layer during backward, outside the forward pass whose context it needs)."""
    setups, forwards = _setups.get(), _forwards.get()

    @contextlib.contextmanager
    def restored():
        setup_token, forward_token = _setups.set(setups), _forwards.set(forwards)
        try:
            yield
        finally:
            _forwards.reset(forward_token)
            _setups.reset(setup_token)

    return restored


def active_setup_for(registry, layer_idx: int, names) -> AdapterCompositionBlock | None:
    """The setup an adapter layer of ``registry``'s model runs now, or None when it runs no adapter.

    The forward context of this model fixes the setup for the pass; outside one (a submodule called directly) the
    AdapterSetup context or the active adapters decide, as in AdapterHub. ``names``: the layer's adapter names; a
    setup that names none of them, or a layer listed in ``skip_layers``, runs nothing.
    """
    context = ForwardContext.for_registry(registry)
    if context is not None:
        setup, skip = context.adapter_setup, context.skip_layers
    else:
        setup = AdapterSetup.get_context_adapter_setup()
        if setup is None:
            setup = registry.active_setup
        skip = registry.skip_layers or ()
    if setup is None or layer_idx in skip:
        return None
    if not any(name in names for name in setup.flatten()):
        return None
    return setup
