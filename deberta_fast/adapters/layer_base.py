"""Shared behaviour of the modules that hold adapters inside a DeBERTa layer (LoRA linears, bottleneck outputs,
prefix tuning, ReFT).

Each such module keeps its adapters in a ``ModuleDict`` (``adapter_modules``) keyed by adapter name, knows its layer
index and its AdapterHub location key, and runs a composition setup by walking the block tree with AdapterHub's
rules. A method supplies ``compose_single`` (one adapter on the running state) and the state operations the blocks
need: ``vslice`` (rows of the batch), ``pad_and_concat`` (rows back together), ``repeat`` (Parallel without
pre-replicated input), ``mean`` (Average). Blocks a method cannot run raise NotImplementedError, as in AdapterHub
(Fuse and Split are bottleneck-only; a method without ``mean`` has no Average).

Parallel: the adapter model replicates its inputs once per channel before the embeddings (the batch is then
[channels · B]); a Parallel block slices channel i's rows and runs child i on them. Called outside such a forward
pass, the block replicates its own input first (AdapterHub's behaviour for a single module).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn

from .composition.blocks import (
    ALLOWED_NESTINGS,
    AdapterCompositionBlock,
    Average,
    BatchSplit,
    Fuse,
    MultiTask,
    Parallel,
    Split,
    Stack,
)
from .context import ForwardContext, active_setup_for

__all__ = ["AdapterLayerBase", "concat_row_labels", "row_groups", "slice_row_labels"]


class AdapterLayerBase:
    """Mixin for adapter-holding modules (see module docstring). Subclasses set ``adapter_modules_name``,
    ``location_key``, ``supported_compositions`` (informational, AdapterHub's list) and implement ``add_adapter``,
    ``compose_single`` and the state operations their blocks use."""

    adapter_modules_name = ""
    supported_compositions: tuple = ()

    def _init_adapter_layer(self, registry, layer_idx: int, location_key: str) -> None:
        # The registry is shared with the model; stored outside nn.Module bookkeeping on purpose.
        object.__setattr__(self, "_registry", registry)
        self.layer_idx = layer_idx
        self.location_key = location_key

    @property
    def adapter_modules(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_modules_name)

    def active_setup(self):
        """The setup this module runs in the current forward pass, or None."""
        return active_setup_for(self._registry, self.layer_idx, self.adapter_modules)

    def forward_context(self) -> ForwardContext | None:
        """The forward context of this module's model, or None outside its forward pass."""
        return ForwardContext.for_registry(self._registry)

    # ---- management -------------------------------------------------------------------------------------------

    def delete_adapter(self, name: str) -> None:
        if name in self.adapter_modules:
            del self.adapter_modules[name]

    def get_adapter(self, name: str):
        return self.adapter_modules[name] if name in self.adapter_modules else None

    def add_fusion_layer(self, fusion_name: str) -> None:
        """AdapterFusion layers exist for bottleneck adapters only; other methods ignore fusions."""

    def delete_fusion_layer(self, fusion_name: str) -> None:
        """See add_fusion_layer."""

    def enable_adapters(self, setup, unfreeze_adapters: bool, unfreeze_fusion: bool) -> None:
        """Make the adapters named in ``setup`` trainable (``unfreeze_adapters``)."""
        if unfreeze_adapters:
            for name in setup.flatten():
                if name in self.adapter_modules:
                    for param in self.adapter_modules[name].parameters():
                        param.requires_grad = True

    def freeze_adapter(self, name: str, freeze: bool = True) -> None:
        if name in self.adapter_modules:
            self.adapter_modules[name].train(not freeze)
            for param in self.adapter_modules[name].parameters():
                param.requires_grad = not freeze

    def average_adapter(self, name: str, input_adapters: dict, combine_strategy: str, **kwargs) -> bool:
        """Add adapter ``name`` whose every tensor is ``sum_i w_i * tensor_i`` over ``input_adapters`` {name: w}.
        Returns False when this module holds no module for ``name`` (its config does not place one here)."""
        if not self.add_adapter(name, self.layer_idx):
            return False
        if combine_strategy != "linear":
            self.delete_adapter(name)
            raise ValueError(f"combine strategy {combine_strategy!r} is not supported by {type(self).__name__}")
        missing = [n for n in input_adapters if n not in self.adapter_modules]
        if missing:
            self.delete_adapter(name)
            raise ValueError(f"cannot average: adapter(s) {missing} have no module in layer {self.layer_idx} "
                             f"({self.location_key})")
        self.adapter_modules[name].load_state_dict(_weighted_state_sum(
            {n: self.adapter_modules[n] for n in input_adapters}, input_adapters))
        return True

    # ---- outputs collected during a forward pass --------------------------------------------------------------

    def store_gating_score(self, adapter_name: str, gate: torch.Tensor) -> None:
        """Record a gate (``output_adapter_gating_scores``): [B, ...] squeezed to numpy; several gates of one
        location in one layer (e.g. the q and v LoRAs) become columns of one array."""
        context = self.forward_context()
        if context is None or not context.output_adapter_gating_scores:
            return
        score = gate.detach().squeeze().float().cpu().numpy()
        if score.ndim == 0:
            score = np.expand_dims(score, axis=0)
        cache = context.adapter_gating_scores[adapter_name].setdefault(self.layer_idx, {})
        previous = cache.get(self.location_key)
        cache[self.location_key] = score if previous is None else np.column_stack((previous, score))

    def store_fusion_attentions(self, fusion_name: str, attentions: torch.Tensor) -> None:
        """Record AdapterFusion probabilities [B, L, n_adapters] (``output_adapter_fusion_attentions``)."""
        context = self.forward_context()
        if context is None or not context.output_adapter_fusion_attentions:
            return
        cache = context.adapter_fusion_attentions[fusion_name].setdefault(self.layer_idx, {})
        cache[self.location_key] = attentions.detach().float().cpu().numpy()

    # ---- composition ------------------------------------------------------------------------------------------

    def compose(self, setup, state):
        if isinstance(setup, AdapterCompositionBlock):
            return self._compose_block(setup, state, 0)
        if setup in self.adapter_modules:
            return self.compose_single(setup, state, 0)
        raise ValueError(f"Invalid adapter setup: {setup!r} is not a valid adapter name or composition block.")

    def _compose_block(self, block, state, level: int):
        handler = {Stack: self.compose_stack, Average: self.compose_average, Fuse: self.compose_fuse,
                   Split: self.compose_split, BatchSplit: self.compose_batch_split, Parallel: self.compose_parallel,
                   MultiTask: self.compose_multi_task}[type(block)]
        return handler(block, state, level)

    def _compose_child(self, parent, child, state, level: int):
        """Run ``child`` of ``parent`` on ``state``; a child without a module here passes the state through."""
        if isinstance(child, AdapterCompositionBlock):
            self.check_composition_valid(parent, child, level)
            return self._compose_block(child, state, level + 1)
        if child in self.adapter_modules:
            return self.compose_single(child, state, level + 1)
        return state

    def check_composition_valid(self, parent, child, level: int) -> None:
        """AdapterHub's per-layer nesting check (same messages)."""
        if isinstance(parent, Stack) and level >= 1:
            raise ValueError(f"Specified adapter setup is too deep. Cannot have {type(child).__name__} at level "
                             f"{level}")
        if type(child) not in ALLOWED_NESTINGS[type(parent)]:
            raise ValueError(f"Cannot nest {type(child).__name__} inside {type(parent).__name__}. Only the following "
                             f"nestings are allowed: {', '.join(t.__name__ for t in ALLOWED_NESTINGS[type(parent)])}")

    def pre_block(self, setup, state):
        return state

    def pre_branches(self, block, state):
        """Before a Parallel / BatchSplit block splits the rows: AdapterHub's pre_block of the whole block."""
        return self.pre_block(block, state)

    def compose_branch(self, block, child, state, level: int):
        """One row group of a Parallel / BatchSplit block."""
        return self._compose_child(block, child, state, level)

    def _bsz(self, state) -> int:
        return state[0].shape[0]

    def _unsupported(self, block, state):
        if set(self.adapter_modules.keys()).isdisjoint(block.flatten()):
            return state
        supported = ", ".join(c.__name__ for c in self.supported_compositions)
        raise NotImplementedError(f"{type(block).__name__} composition is not supported by {type(self).__name__} "
                                  f"({self.location_key}); as in AdapterHub, it runs {supported}")

    def compose_stack(self, block, state, level: int):
        for child in block:
            if isinstance(child, AdapterCompositionBlock):
                self.check_composition_valid(block, child, level)
                state = self._compose_block(child, state, level + 1)
            elif child in self.adapter_modules:
                state = self.pre_block(child, state)
                state = self.compose_single(child, state, level + 1)
        return state

    def compose_fuse(self, block, state, level: int):
        return self._unsupported(block, state)

    def compose_split(self, block, state, level: int):
        return self._unsupported(block, state)

    def compose_average(self, block, state, level: int):
        state = self.pre_block(block, state)
        outputs, weights = [], []
        for child, weight in zip(block, block.weights):
            if isinstance(child, AdapterCompositionBlock):
                self.check_composition_valid(block, child, level)
                outputs.append(self._compose_block(child, state, level + 1))
            elif child in self.adapter_modules:
                outputs.append(self.compose_single(child, state, level + 1))
            else:
                continue
            weights.append(weight)
        if not outputs:
            return state
        return self.mean(outputs, weights)

    def mean(self, states: list, weights: list):
        raise NotImplementedError(f"Average composition is not supported by {type(self).__name__} "
                                  f"({self.location_key})")

    def compose_batch_split(self, block, state, level: int):
        if sum(block.batch_sizes) != self._bsz(state):
            raise IndexError(f"The given batch has a size of {self._bsz(state)} which is not equal to the sum of "
                             f"batch_sizes {block.batch_sizes}")
        state = self.pre_branches(block, state)
        parts, start = [], 0
        for child, size in zip(block, block.batch_sizes):
            parts.append(self.compose_branch(block, child, self.vslice(state, slice(start, start + size)), level))
            start += size
        return self.pad_and_concat(parts)

    def compose_parallel(self, block, state, level: int):
        context = self.forward_context()
        channels = block.parallel_channels
        if context is None or not context.adapters_parallelized:
            original = self._bsz(state)
            state = self.repeat(state, channels)
            if context is not None:
                context.adapters_parallelized = True
                context.original_batch_size = original
        else:
            batch = self._bsz(state)
            if batch % channels != 0:
                raise ValueError("The total input batch size in a Parallel adapter block must be divisible by the "
                                 "number of parallel channels.")
            original = batch // channels
        state = self.pre_branches(block, state)
        parts = [self.compose_branch(block, child, self.vslice(state, slice(i * original, (i + 1) * original)), level)
                 for i, child in enumerate(block)]
        return self.pad_and_concat(parts)

    def task_ids_of(self, block, state) -> torch.Tensor:
        """The forward pass's ``task_ids`` as child indices of MultiTask ``block`` ([B] long tensor)."""
        context = self.forward_context()
        task_ids = context.task_ids if context is not None else None
        if task_ids is None:
            raise ValueError("a MultiTask setup needs task_ids: pass task_ids=[...] (one per batch row) to forward()")
        if isinstance(task_ids, (list, tuple)) and task_ids and isinstance(task_ids[0], str):
            task_ids = [block.children.index(task) for task in task_ids]
        return torch.as_tensor(task_ids, device=self._device_of(state))

    def compose_multi_task(self, block, state, level: int):
        """Rows routed to child ``task_ids[row]`` (ints, or child names): a BatchSplit over the rows sorted by task."""
        task_ids = self.task_ids_of(block, state)
        order = task_ids.argsort(stable=True)
        sizes = task_ids.bincount(minlength=len(block)).tolist()
        split = BatchSplit(*block.children, batch_sizes=sizes)
        state = self.compose_batch_split(split, self.vslice(state, order), level)
        return self.vslice(state, order.argsort())

    def _device_of(self, state):
        return state[0].device

    def vslice(self, state, index):
        raise NotImplementedError(f"{type(self).__name__} cannot split its state along the batch")

    def pad_and_concat(self, states: list):
        raise NotImplementedError(f"{type(self).__name__} cannot concatenate states along the batch")

    def repeat(self, state, channels: int):
        raise NotImplementedError(f"{type(self).__name__} cannot replicate its state for Parallel")


def _weighted_state_sum(modules: dict, weights: dict) -> dict:
    total = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            total[key] = total[key] + weights[name] * value if key in total else weights[name] * value
    return total


# Row labels: which adapter finishes each batch row of a composed state. A single name (or None) stands for every
# row; after Parallel / BatchSplit with different children it becomes a tuple with one entry per row.

def slice_row_labels(labels, index):
    """The labels of rows ``index`` (a slice or an index tensor)."""
    if not isinstance(labels, tuple):
        return labels
    if isinstance(index, slice):
        return labels[index]
    return tuple(labels[i] for i in index.tolist())


def concat_row_labels(parts) -> str | tuple | None:
    """Labels of row groups put one after the other; ``parts``: [(labels, number of rows)]."""
    labels = [x for x, _ in parts]
    if all(not isinstance(x, tuple) for x in labels) and len(set(labels)) == 1:
        return labels[0]
    rows = []
    for x, count in parts:
        rows.extend(x if isinstance(x, tuple) else (x,) * count)
    return tuple(rows)


def row_groups(labels):
    """[(label, slice)] runs of equal labels of a per-row tuple."""
    groups, start = [], 0
    for label, run in itertools.groupby(labels):
        stop = start + len(list(run))
        groups.append((label, slice(start, stop)))
        start = stop
    return groups
