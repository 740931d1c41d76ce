"""Composition blocks: how several adapters combine in one forward pass (AdapterHub's names and nesting rules).

``Stack("a", "b")`` runs a then b; ``Fuse`` mixes bottleneck outputs by attention (AdapterFusion); ``Split`` sends
sequence slices to different adapters; ``BatchSplit`` sends batch slices; ``Parallel`` replicates the batch once per
child; ``Average`` takes a weighted mean of the children's outputs. A bare adapter name at the top level means
``Stack(name)``. Which blocks each adapter method can run is declared by the method's layer
(``supported_compositions``); this module only describes and validates setups.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

__all__ = [
    "ALLOWED_NESTINGS",
    "AdapterCompositionBlock",
    "Average",
    "BatchSplit",
    "Fuse",
    "MultiTask",
    "Parallel",
    "Split",
    "Stack",
    "parse_composition",
    "parse_heads_from_composition",
    "validate_composition",
]


class AdapterCompositionBlock(Sequence):
    """A node of an adapter setup; children are adapter names (str) or nested blocks."""

    def __init__(self, *children):
        self.children = [parse_composition(child, None) for child in children]

    def __getitem__(self, index):
        return self.children[index]

    def __len__(self):
        return len(self.children)

    def __eq__(self, other):
        return type(other) is type(self) and self.children == other.children and self._kwargs() == other._kwargs()

    def __hash__(self):
        return hash((type(self).__name__, tuple(self.flatten_ordered())))

    def __repr__(self):
        return f"{type(self).__name__}[{', '.join(map(str, self.children))}]"

    def first(self) -> str:
        """The first adapter name, depth first."""
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        """The last adapter name, depth first."""
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    @property
    def parallel_channels(self) -> int:
        return max(c.parallel_channels if isinstance(c, AdapterCompositionBlock) else 1 for c in self.children)

    def flatten(self) -> set[str]:
        """Every adapter name in the setup."""
        return set(self.flatten_ordered())

    def flatten_ordered(self) -> list[str]:
        return list(itertools.chain.from_iterable([c] if isinstance(c, str) else c.flatten_ordered()
                                                  for c in self.children))

    def _kwargs(self) -> dict | None:
        return None

    def to_dict(self) -> dict:
        """AdapterHub's ``adapter_setup.json`` form."""
        data = {
            "type": type(self).__name__,
            "children": [c.to_dict() if isinstance(c, AdapterCompositionBlock) else {"type": "single", "children": [c]}
                         for c in self.children],
        }
        if self._kwargs():
            data["kwargs"] = self._kwargs()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterCompositionBlock:
        block_class = BLOCK_TYPES.get(data.get("type"))
        if block_class is None:
            raise ValueError(f"unknown composition block type {data.get('type')!r}; "
                             f"expected one of {sorted(BLOCK_TYPES)}")
        children = [c["children"][0] if c["type"] == "single" else cls.from_dict(c) for c in data["children"]]
        return block_class(*children, **data.get("kwargs", {}))


class Stack(AdapterCompositionBlock):
    """Children applied one after the other (LoRA: the second LoRA reads the first one's update)."""


class Parallel(AdapterCompositionBlock):
    """Every child on its own copy of the batch; outputs are concatenated along the batch."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Fuse(AdapterCompositionBlock):
    """AdapterFusion over the children's bottleneck outputs; ``name`` defaults to the children joined by commas."""

    def __init__(self, *children, name: str | None = None):
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)


class Split(AdapterCompositionBlock):
    """Sequence positions split between the children (``splits`` tokens each)."""

    def __init__(self, *children, splits):
        super().__init__(*children)
        self.splits = list(splits) if isinstance(splits, (list, tuple)) else [splits] * len(children)

    def _kwargs(self):
        return {"splits": self.splits}


class BatchSplit(AdapterCompositionBlock):
    """Batch rows split between the children (``batch_sizes`` rows each)."""

    def __init__(self, *children, batch_sizes):
        super().__init__(*children)
        self.batch_sizes = (list(batch_sizes) if isinstance(batch_sizes, (list, tuple))
                            else [batch_sizes] * len(children))

    def _kwargs(self):
        return {"batch_sizes": self.batch_sizes}


class MultiTask(AdapterCompositionBlock):
    """Rows routed to children by the forward's ``task_ids`` (MTL-LoRA)."""


class Average(AdapterCompositionBlock):
    """Weighted mean of the children's outputs; ``weights`` default to equal, normalised to sum 1 unless told."""

    def __init__(self, *children, weights: Sequence[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        if weights is None:
            self.weights = [1.0 / len(children)] * len(children)
        else:
            if len(weights) != len(children):
                raise ValueError(f"Average: {len(weights)} weights for {len(children)} children")
            total = sum(weights) if normalize_weights else 1.0
            if normalize_weights and total == 0:
                raise ValueError("Average: the weights sum to 0 and cannot be normalised")
            self.weights = [w / total for w in weights]

    def _kwargs(self):
        return {"weights": self.weights}


BLOCK_TYPES = {cls.__name__: cls for cls in (Stack, Parallel, Fuse, Split, BatchSplit, MultiTask, Average)}

# Which child types each block may contain (AdapterHub's table).
ALLOWED_NESTINGS = {
    Stack: [str, Fuse, Split, Parallel, BatchSplit, Average, MultiTask],
    Fuse: [str, Stack],
    Split: [str, Split, Stack, BatchSplit, Average],
    Parallel: [str, Stack, BatchSplit, Average],
    MultiTask: [str, Stack, Average, Fuse],
    BatchSplit: [str, Stack, Split, BatchSplit, Average],
    Average: [str, Stack, Split, BatchSplit],
}

# Blocks that only some model types support; DeBERTa-v2 is on AdapterHub's list for Parallel.
SUPPORTED_MODELS = {Parallel: ["albert", "bert", "roberta", "distilbert", "deberta-v2", "deberta", "bart", "mbart",
                               "mt5", "plbart", "gpt2", "gptj", "t5", "vit", "xlm-roberta", "bert-generation",
                               "llama", "mistral", "electra", "whisper", "xmod"]}


def validate_composition(setup, level: int = 0, model_type: str | None = None) -> None:
    """Raise ValueError (AdapterHub's messages) when ``setup`` nests blocks AdapterHub does not allow, is nested
    too deep, or uses a block the model type does not support."""
    if level > 1 and not isinstance(setup, (Stack, str)):
        raise ValueError(f"Adapter setup is too deep. Cannot have {setup} at level {level}.")
    if isinstance(setup, AdapterCompositionBlock):
        block_type = type(setup)
        if model_type and block_type in SUPPORTED_MODELS and model_type not in SUPPORTED_MODELS[block_type]:
            raise ValueError(f"Models of type {model_type} don't support adapter composition using "
                             f"{block_type.__name__}.")
        for child in setup:
            if type(child) not in ALLOWED_NESTINGS[block_type]:
                raise ValueError(f"Adapter setup is invalid. Cannot nest {child} in {setup}")
            validate_composition(child, level=level + 1)


def parse_composition(setup, level: int | None = 0, model_type: str | None = None):
    """Normalise an adapter setup: None/empty -> None, ``"a"`` -> ``Stack("a")`` at the top level, a list ->
    ``Stack`` (deprecated; a list inside a list is ``Fuse``), a block -> validated unless ``level`` is None."""
    if not setup:
        return None
    if isinstance(setup, AdapterCompositionBlock):
        if level is not None:
            validate_composition(setup, level=level, model_type=model_type)
        return setup
    if isinstance(setup, str):
        return Stack(setup) if level == 0 else setup
    if isinstance(setup, Sequence):
        warnings.warn("Passing a list of adapters is deprecated; use Stack or Fuse explicitly.", FutureWarning,
                      stacklevel=2)
        block_class = Fuse if level == 1 else Stack
        child_level = level + 1 if level is not None else None
        return block_class(*[parse_composition(child, child_level) for child in setup])
    raise TypeError(f"an adapter setup must be a name, a list of names or a composition block; got {setup!r}")


def parse_heads_from_composition(setup, reference_heads=None):
    """The head(s) a setup activates: the last adapter's name (Stack), one head per child (Parallel), a BatchSplit
    of heads (BatchSplit), else None. With ``reference_heads`` only existing heads are returned."""
    final = setup.children[-1] if isinstance(setup, Stack) else setup
    if isinstance(final, str):
        return final if reference_heads is None or final in reference_heads else None
    if isinstance(final, Parallel):
        return [c if isinstance(c, str) else c.last() for c in final.children]
    if isinstance(final, BatchSplit):
        heads = [c.last() if isinstance(c, AdapterCompositionBlock) else c for c in final]
        if reference_heads is not None and not all(h in reference_heads for h in heads):
            raise ValueError(f"Missing at least one head for the given BatchSplit setup. Expected heads: {heads}")
        return BatchSplit(*heads, batch_sizes=final.batch_sizes)
    return None
