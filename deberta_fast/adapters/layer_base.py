"""Shared behaviour of the modules that hold adapters inside a DeBERTa layer (LoRA linears, bottleneck outputs).

Each such module keeps its adapters in a ``ModuleDict`` (``adapter_modules``) keyed by adapter name, knows its layer
index and its AdapterHub location key, and runs a composition setup by walking the block tree. Each method supplies
``compose_single`` (one adapter on the running state) and the state operations a block needs; blocks a method does
not implement raise NotImplementedError naming the block (issue 5 fills in Fuse, Split, BatchSplit, Parallel).
"""

from __future__ import annotations

import torch.nn as nn

from .composition import (
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
from .context import active_setup_for

__all__ = ["AdapterLayerBase"]


class AdapterLayerBase:
    """Mixin for adapter-holding modules (see module docstring). Subclasses set ``adapter_modules_name``,
    ``location_key``, ``supported_compositions`` and implement ``add_adapter`` and ``compose_single``."""

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

    # ---- management -------------------------------------------------------------------------------------------

    def delete_adapter(self, name: str) -> None:
        if name in self.adapter_modules:
            del self.adapter_modules[name]

    def get_adapter(self, name: str):
        return self.adapter_modules[name] if name in self.adapter_modules else None

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

    # ---- composition ------------------------------------------------------------------------------------------

    def compose(self, setup, state):
        if isinstance(setup, AdapterCompositionBlock):
            return self._compose_block(setup, state, 0)
        if setup in self.adapter_modules:
            return self.compose_single(setup, state, 0)
        raise ValueError(f"invalid adapter setup {setup!r}: not an adapter name or composition block")

    def _compose_block(self, block, state, level: int):
        if type(block) not in self.supported_compositions:
            raise NotImplementedError(
                f"{type(block).__name__} composition is not implemented for {type(self).__name__} "
                f"({self.location_key}) in this version of deberta_fast"
            )
        handler = {Stack: self.compose_stack, Average: self.compose_average, Fuse: self.compose_fuse,
                   Split: self.compose_split, BatchSplit: self.compose_batch_split, Parallel: self.compose_parallel,
                   MultiTask: self.compose_multi_task}[type(block)]
        return handler(block, state, level)

    def check_composition_valid(self, parent, child, level: int) -> None:
        if isinstance(parent, Stack) and level >= 1:
            raise ValueError(f"adapter setup is too deep: cannot have {type(child).__name__} at level {level}")
        if type(child) not in ALLOWED_NESTINGS[type(parent)]:
            raise ValueError(f"cannot nest {type(child).__name__} inside {type(parent).__name__}")

    def pre_block(self, setup, state):
        return state

    def compose_stack(self, block, state, level: int):
        for child in block:
            if isinstance(child, AdapterCompositionBlock):
                self.check_composition_valid(block, child, level)
                state = self._compose_block(child, state, level + 1)
            elif child in self.adapter_modules:
                state = self.pre_block(child, state)
                state = self.compose_single(child, state, level + 1)
        return state

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

    def compose_fuse(self, block, state, level: int):
        raise NotImplementedError(f"Fuse is not implemented for {type(self).__name__} in this version")

    def compose_split(self, block, state, level: int):
        raise NotImplementedError(f"Split is not implemented for {type(self).__name__} in this version")

    def compose_batch_split(self, block, state, level: int):
        raise NotImplementedError(f"BatchSplit is not implemented for {type(self).__name__} in this version")

    def compose_parallel(self, block, state, level: int):
        raise NotImplementedError(f"Parallel is not implemented for {type(self).__name__} in this version")

    def compose_multi_task(self, block, state, level: int):
        raise NotImplementedError(f"MultiTask is not implemented for {type(self).__name__} in this version")


def _weighted_state_sum(modules: dict, weights: dict) -> dict:
    total = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            total[key] = total[key] + weights[name] * value if key in total else weights[name] * value
    return total
