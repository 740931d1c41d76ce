"""Adapter configurations with AdapterHub 1.3.0's names, fields, defaults and JSON keys.

A configuration is an immutable dataclass that also behaves as a read-only mapping (``config["r"]``,
``config.get("leave_out")``, ``dict(config)``), exactly like AdapterHub's, so that configs written by either library
load in the other. ``AdapterConfig.load`` accepts:

- a config object (returned unchanged) or a dict (the ``"architecture"`` key picks the class; no key = bottleneck),
- a name from :data:`ADAPTER_CONFIG_MAP`, optionally with overrides: ``"lora[r=4, alpha=16]"``,
- several such names joined by ``|`` (a :class:`ConfigUnion`): ``"lora[r=4]|seq_bn"``,
- the path of a JSON file (a bare config or an ``adapter_config.json`` with a ``"config"`` section).

Unknown names, unknown keys and unknown architectures raise ``ValueError`` naming them. Which methods this version
of deberta_fast can *run* is decided by the model (``supports_adapter``: all but invertible adapters and stochastic
depth); every AdapterHub config parses here.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownConfigKeyError

__all__ = [
    "ADAPTER_CONFIG_MAP",
    "DEFAULT_ADAPTER_CONFIG",
    "AdapterConfig",
    "ConfigValueError",
    "BnConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigUnion",
    "DiReftConfig",
    "DoRAConfig",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "IA3Config",
    "LoRAConfig",
    "LoReftConfig",
    "MAMConfig",
    "NoReftConfig",
    "ParBnConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "SeqBnConfig",
    "SeqBnInvConfig",
    "UniPELTConfig",
    "VeraConfig",
    "adapter_config_hash",
    "parse_config_string",
]


class ConfigValueError(ValueError, TypeError):
    """A config field with a value of the wrong type or out of range. Both a ValueError and a TypeError, so that
    code catching either (as around AdapterHub, where such values fail later with one or the other) catches it."""


# Fields whose value must be an integer >= 1 / >= 0, or a probability in [0, 1).
_POSITIVE_INTS = {"r", "phm_dim", "phm_rank", "prefix_length", "prompt_length", "bottleneck_size", "n_up_projection"}
_NON_NEGATIVE_INTS = {"prefix_positions", "suffix_positions"}
_PROBABILITIES = {"dropout", "stochastic_depth"}
_NUMBERS = {"alpha"}  # annotated int by AdapterHub, used as a float scale


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(config_name: str, name: str, annotation: str, value) -> None:
    """Raise ConfigValueError naming the field when ``value`` does not fit its annotation or range."""
    def fail(expected):
        raise ConfigValueError(f"{config_name}: {name} must be {expected}; got {value!r}")

    kinds = {part.strip() for part in annotation.split("|")}
    if value is None:
        if "None" not in kinds:
            fail(f"{' or '.join(sorted(kinds))}, not None")
        return
    if name in _NUMBERS:
        if not _is_number(value):
            fail("a finite number")
    elif name in _POSITIVE_INTS or name in _NON_NEGATIVE_INTS:
        low = 1 if name in _POSITIVE_INTS else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            fail(f"an integer >= {low}")
    elif name in _PROBABILITIES:
        if not _is_number(value) or not 0 <= value < 1:
            fail("a number in [0, 1)")
    elif kinds <= {"int", "None"}:
        if not isinstance(value, int) or isinstance(value, bool):
            fail("an integer")
    elif kinds <= {"float", "None"}:
        if not _is_number(value):
            fail("a finite number")
    elif kinds <= {"bool", "None"}:
        if not isinstance(value, bool):
            fail("True or False")
    elif kinds <= {"str", "None"}:
        if not isinstance(value, str):
            fail("a string")
    elif kinds == {"float", "Mapping"}:
        if not (isinstance(value, Mapping) or (_is_number(value) and value > 0)):
            fail("a number > 0 or a per-layer mapping")


class AdapterConfig(Mapping):
    """Base of every adapter configuration: immutable, a read-only mapping of its fields, JSON round trip."""

    architecture: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_field(type(self).__name__, f.name, str(f.type), getattr(self, f.name))

    def __init__(self):
        raise TypeError("AdapterConfig is abstract: use a concrete class such as LoRAConfig or SeqBnConfig")

    # Immutability: a field is set once (by the dataclass __init__), never changed afterwards; changes go through
    # replace(), which validates and builds a new object.
    def __setattr__(self, name, value):
        if name in self.__dict__:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}; use config.replace({name}=...)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __getitem__(self, key):
        return self.__dict__[key]

    def __iter__(self):
        return iter(self.__dict__)

    def __len__(self):
        return len(self.__dict__)

    def __eq__(self, other):
        return isinstance(other, Mapping) and self.to_dict() == _as_dict(other)

    def __hash__(self):
        return hash(adapter_config_hash(self))

    def to_dict(self) -> dict:
        """The JSON form AdapterHub writes (every field, ``architecture`` included)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> AdapterConfig:
        """A copy with ``changes`` applied; unknown keys raise ValueError naming them."""
        _check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, config: Mapping) -> AdapterConfig:
        """Build ``cls`` from a dict of its fields (an ``architecture`` entry must match the class)."""
        if isinstance(config, AdapterConfig):
            return config
        values = dict(config)
        architecture = values.pop("architecture", cls.architecture)
        if architecture != cls.architecture and not (cls.architecture is None and architecture == "bottleneck"):
            raise ValueError(
                f"config has architecture {architecture!r}, but {cls.__name__} is for {cls.architecture!r}"
            )
        values = _translate_legacy_keys(values)
        _check_keys(cls, values)
        return cls(**values)

    @classmethod
    def load(cls, config, download_kwargs=None, **kwargs) -> AdapterConfig | None:
        """Resolve ``config`` (module docstring) to a config object; ``kwargs`` that are not None override fields."""
        if download_kwargs:
            raise ValueError("download_kwargs: deberta_fast resolves configs locally only (no AdapterHub Hub access)")
        if isinstance(config, str) and not config.strip():
            raise ValueError("config: an empty string; expected a name from ADAPTER_CONFIG_MAP (optionally "
                             "'name[key=value, ...]'), a dict, a JSON file path or an AdapterConfig")
        if config is None or (not isinstance(config, AdapterConfig) and not config):
            return None
        if isinstance(config, AdapterConfig):
            resolved = config
        elif isinstance(config, Mapping):
            resolved = _config_from_dict(config)
        elif isinstance(config, str):
            resolved = _config_from_string(config)
        else:
            raise ValueError(
                "config must be a name from ADAPTER_CONFIG_MAP (optionally 'name[key=value, ...]'), a dict, a JSON "
                f"file path or an AdapterConfig; got {type(config).__name__}"
            )
        overrides = {k: v for k, v in kwargs.items() if v is not None}
        return resolved.replace(**overrides) if overrides else resolved


def _as_dict(config: Mapping) -> dict:
    return config.to_dict() if isinstance(config, AdapterConfig) else dict(config)


# Keys written by AdapterHub versions before 1.0 that map onto current fields.
def _translate_legacy_keys(values: dict) -> dict:
    legacy_invertible = values.pop("invertible_adapter", None)
    if legacy_invertible:
        values.setdefault("inv_adapter", legacy_invertible["block_type"])
        values.setdefault("inv_adapter_reduction_factor", legacy_invertible["reduction_factor"])
    return values


def _check_keys(cls, values: Mapping) -> None:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UnknownConfigKeyError(
            f"unknown config key(s) {unknown} for {cls.__name__}; known keys: {sorted(known - {'architecture'})}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck adapters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class BnConfig(AdapterConfig):
    """Bottleneck adapter: ``up(act(down(x))) * scaling`` placed after the attention block (``mh_adapter``) and/or
    the feed-forward block (``output_adapter``) of each layer. Fields and defaults are AdapterHub's.

    reduction_factor: hidden_size // reduction_factor bottleneck units (a float, or a per-layer mapping
    ``{"0": 8, "default": 16}``). scaling: a float, ``"learned"`` (a trained scalar) or ``"channel"`` (a trained
    [hidden] vector). ``phm_*``: Compacter's PHM projections (methods/phm.py). ``inv_adapter``: an invertible
    adapter ("nice" or "glow") on the embeddings (methods/invertible.py). ``cross_adapter`` and ``stochastic_depth``
    parse but are not run by this version (``supports_adapter`` says so).
    """

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | Mapping
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool | None = True
    shared_W_phm: bool | None = False
    shared_phm_rule: bool | None = True
    factorized_phm_rule: bool | None = False
    phm_c_init: str | None = "normal"
    phm_init_range: float | None = 0.0001
    learn_phm: bool | None = True
    hypercomplex_nonlinearity: str | None = "glorot-uniform"
    phm_rank: int | None = 1
    phm_bias: bool | None = True
    stochastic_depth: float | None = 0.0



@dataclass(eq=False)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward block, ReLU, reduction 16."""

    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping = 16


@dataclass(eq=False)
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++ (Mahabadi et al., 2021): seq_bn with PHM layers."""

    phm_layer: bool = True
    reduction_factor: float | Mapping = 32
    non_linearity: str = "gelu"


@dataclass(eq=False)
class SeqBnInvConfig(SeqBnConfig):
    """seq_bn plus an invertible NICE adapter on the embeddings."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(eq=False)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after the attention block and after the feed-forward block, swish."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | Mapping = 16


@dataclass(eq=False)
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter (Mahabadi et al., 2021): double_seq_bn with PHM layers."""

    phm_layer: bool = True
    reduction_factor: float | Mapping = 32
    non_linearity: str = "gelu"


@dataclass(eq=False)
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """double_seq_bn plus an invertible NICE adapter on the embeddings."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(eq=False)
class ParBnConfig(BnConfig):
    """He et al. (2021): a parallel adapter reading the feed-forward block's input, scaled by 4, reduction 2."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclass(eq=False)
class AdapterPlusConfig(BnConfig):
    """AdapterPlus (Steitz & Roth, 2024); needs stochastic depth, so not run by this version."""

    original_ln_after: bool = False
    original_ln_before: bool = True
    residual_before_ln: bool | str = False
    stochastic_depth: float | None = 0.1
    init_weights: str = "houlsby"
    scaling: float | str = "channel"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | Mapping = 96
    non_linearity: str = "gelu"


# ----------------------------------------------------------------------------------------------------------------
# LoRA family
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al., 2021): ``W x + b + (alpha / r) · B A x`` on the attention projections named in
    ``attn_matrices`` (``selfattn_lora``), on ``intermediate.dense`` (``intermediate_lora``) and on ``output.dense``
    (``output_lora``). ``composition_mode="scale"`` is (IA)³ (:class:`IA3Config`); ``use_dora=True`` is DoRA and
    a float ``vera_d`` / ``vera_b`` is VeRA (adapters/methods/).
    """

    architecture: str | None = "lora"
    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list = field(default_factory=list)
    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    attn_matrices: list = field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    dtype: str | None = None


@dataclass(eq=False)
class IA3Config(LoRAConfig):
    """(IA)³ (Liu et al., 2022): ``(W x + b) ⊙ (alpha · l)`` on key, value and intermediate projections."""

    selfattn_lora: bool = True
    intermediate_lora: bool = True
    output_lora: bool = False
    leave_out: list = field(default_factory=list)
    r: int = 1
    alpha: int = 1
    dropout: float = 0.0
    attn_matrices: list = field(default_factory=lambda: ["k", "v"])
    composition_mode: str = "scale"
    init_weights: str = "ia3"
    use_gating: bool = False
    dtype: str | None = None


@dataclass(eq=False)
class VeraConfig(LoRAConfig):
    """VeRA (Kopiczko et al., 2024): frozen shared random A/B, trained diagonal scalings (methods/vera.py)."""

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    r: int = 8
    vera_d: float | None = 0.1
    vera_b: float | None = 0.0
    init_weights: str = "vera"
    composition_mode: str = "add"
    dtype: str | None = None


@dataclass(eq=False)
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., 2024): LoRA plus a trained magnitude per output row (methods/dora.py)."""

    use_dora: bool = True


@dataclass(eq=False)
class DvoRAConfig(LoRAConfig):
    """DvoRA: VeRA with DoRA's magnitude rescaling (methods/vera.py, methods/dora.py)."""

    vera_d: float | None = 0.1
    vera_b: float | None = 0.0
    init_weights: str = "vera"
    use_dora: bool = True


@dataclass(eq=False)
class MTLLoRAConfig(LoRAConfig):
    """MTL-LoRA (Yang et al., 2024): LoRA with a task-specific matrix and weighted up-projections, routed per task
    by ``MultiTask`` (methods/mtl_lora.py)."""

    architecture: str | None = "mtl_lora"
    n_up_projection: int = 1
    task_specific_matrix_type: str = "singular_values"
    weights_sharpness: float = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Prefix tuning, prompt tuning, ReFT, unions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang, 2021): ``prefix_length`` learned keys / values per layer, produced by an MLP of
    width ``bottleneck_size`` (or stored directly with ``flat``); ``use_gating`` scales them by a learned gate."""

    architecture: str | None = "prefix_tuning"
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list = field(default_factory=list)
    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    init_weights_seed: int | None = None


@dataclass(eq=False)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (Lester et al., 2021): ``prompt_length`` learned embeddings inserted after the embeddings."""

    architecture: str | None = "prompt_tuning"
    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    combine: str = "prefix"
    init_weights_seed: int | None = None


@dataclass(eq=False)
class ReftConfig(AdapterConfig):
    """Representation fine-tuning (Wu et al., 2024): interventions on the outputs of the chosen layers at the first
    ``prefix_positions`` / last ``suffix_positions`` tokens. ``subtract_projection=False`` is DiReFT.

    ``subtract_projection`` is written to JSON only when False: AdapterHub's ReftConfig has no such field (it loses
    DiReFT's setting on save); it reads the extra key back as an attribute, so files stay loadable there.
    """

    layers: Any = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None
    architecture: str | None = "reft"
    output_reft: bool = True
    init_weights_seed: int | None = None
    subtract_projection: bool = True

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data.get("subtract_projection") is True:
            del data["subtract_projection"]
        return data


@dataclass(eq=False)
class LoReftConfig(ReftConfig):
    """LoReFT: orthogonal projection."""


@dataclass(eq=False)
class NoReftConfig(ReftConfig):
    """ReFT without the orthogonality constraint."""

    orthogonality: bool = False


@dataclass(eq=False)
class DiReftConfig(ReftConfig):
    """ReFT without orthogonality and projection subtraction."""

    orthogonality: bool = False
    subtract_projection: bool = False


class ConfigUnion(AdapterConfig):
    """Several method configs under one adapter name (e.g. LoRA on attention plus a bottleneck adapter).

    Two members of the same method conflict, except bottleneck members placed at different locations.
    """

    architecture = "union"

    def __init__(self, *configs: AdapterConfig):
        self.validate(configs)
        object.__setattr__(self, "configs", list(configs))

    @staticmethod
    def validate(configs) -> None:
        for config in configs:
            if not isinstance(config, AdapterConfig) or isinstance(config, ConfigUnion):
                raise TypeError(f"ConfigUnion members must be method configs (not unions); got {config!r}")
        for i, first in enumerate(configs):
            for second in configs[i + 1:]:
                if first.architecture != second.architecture or first.get("leave_out") or second.get("leave_out"):
                    continue
                if first.architecture is None:
                    different_places = (first["mh_adapter"] != second["mh_adapter"]
                                        and first["output_adapter"] != second["output_adapter"])
                    if different_places:
                        continue
                    raise ValueError(f"{first} and {second} cannot be combined: both place a bottleneck adapter at "
                                     "the same location")
                raise ValueError(f"{first} and {second} have the same adapter architecture and cannot be combined")

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.configs[key]
        if key in ("architecture", "configs"):
            return getattr(self, key)
        index, name = key.split(".", 1)
        return self.configs[int(index)][name]

    def __iter__(self):
        for i, config in enumerate(self.configs):
            for key in config:
                yield f"{i}.{key}"

    def __len__(self):
        return sum(len(c) for c in self.configs)

    def __eq__(self, other):
        return isinstance(other, ConfigUnion) and len(self.configs) == len(other.configs) and all(
            a == b for a, b in zip(self.configs, other.configs)
        )

    __hash__ = AdapterConfig.__hash__

    def __repr__(self):
        return f"ConfigUnion({', '.join(map(repr, self.configs))})"

    def to_dict(self) -> dict:
        return {"architecture": "union", "configs": [c.to_dict() for c in self.configs]}

    def replace(self, **changes) -> ConfigUnion:
        unknown = sorted(k for k in changes if not any(k in c.__dict__ for c in self.configs))
        if unknown:
            raise UnknownConfigKeyError(f"unknown config key(s) {unknown} for every member of {self!r}")
        return ConfigUnion(*[c.replace(**{k: v for k, v in changes.items() if k in c.__dict__}) for c in self.configs])

    @classmethod
    def from_dict(cls, config: Mapping) -> ConfigUnion:
        if isinstance(config, AdapterConfig):
            return config
        if "configs" not in config:
            raise ValueError("a union config needs a 'configs' list")
        return cls(*[_config_from_dict(c) for c in config["configs"]])


class MAMConfig(ConfigUnion):
    """Mix-and-Match (He et al., 2021): prefix tuning + parallel bottleneck."""

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None):
        super().__init__(prefix_tuning or PrefixTuningConfig(bottleneck_size=800), adapter or ParBnConfig())


class UniPELTConfig(ConfigUnion):
    """UniPELT (Mao et al., 2022): gated prefix tuning + seq_bn + LoRA."""

    def __init__(self, prefix_tuning=None, adapter=None, lora=None):
        members = [prefix_tuning or PrefixTuningConfig(prefix_length=10), adapter or SeqBnConfig(reduction_factor=16),
                   lora or LoRAConfig(r=8, alpha=2)]
        super().__init__(*[m.replace(use_gating=True) for m in members])


ADAPTER_CONFIG_MAP: dict[str, AdapterConfig] = {
    # names AdapterHub still accepts for backwards compatibility
    "pfeiffer": SeqBnConfig(),
    "houlsby": DoubleSeqBnConfig(),
    "parallel": ParBnConfig(),
    "scaled_parallel": ParBnConfig(scaling="learned"),
    "pfeiffer+inv": SeqBnInvConfig(),
    "houlsby+inv": DoubleSeqBnInvConfig(),
    # current names
    "seq_bn": SeqBnConfig(),
    "double_seq_bn": DoubleSeqBnConfig(),
    "par_bn": ParBnConfig(),
    "scaled_par_bn": ParBnConfig(scaling="learned"),
    "seq_bn_inv": SeqBnInvConfig(),
    "double_seq_bn_inv": DoubleSeqBnInvConfig(),
    "compacter++": CompacterPlusPlusConfig(),
    "compacter": CompacterConfig(),
    "prefix_tuning": PrefixTuningConfig(),
    "prefix_tuning_flat": PrefixTuningConfig(flat=True),
    "prompt_tuning": PromptTuningConfig(),
    "mtl_lora": MTLLoRAConfig(),
    "lora": LoRAConfig(),
    "ia3": IA3Config(),
    "vera": VeraConfig(),
    "dora": DoRAConfig(),
    "dvora": DvoRAConfig(),
    "loreft": LoReftConfig(),
    "noreft": NoReftConfig(),
    "direft": DiReftConfig(),
    "mam": MAMConfig(),
    "unipelt": UniPELTConfig(),
}

DEFAULT_ADAPTER_CONFIG = "seq_bn"

_ARCHITECTURE_CLASSES = {
    None: BnConfig,
    "bottleneck": BnConfig,
    "lora": LoRAConfig,
    "mtl_lora": MTLLoRAConfig,
    "prefix_tuning": PrefixTuningConfig,
    "prompt_tuning": PromptTuningConfig,
    "reft": ReftConfig,
    "union": ConfigUnion,
}


def _config_from_dict(config: Mapping) -> AdapterConfig:
    architecture = config.get("architecture")
    cls = _ARCHITECTURE_CLASSES.get(architecture)
    if cls is None:
        raise ValueError(
            f"unknown adapter architecture {architecture!r}; expected one of "
            f"{sorted(k for k in _ARCHITECTURE_CLASSES if k)} or none (bottleneck)"
        )
    return cls.from_dict(config)


# name, optionally followed by "[key=value, ...]"; "|" separates union members
_CONFIG_STRING = re.compile(r"^(?P<name>[^\[\]|\n]+)(?:\[(?P<overrides>.*)\])?$")


def parse_config_string(text: str) -> list[tuple[str, dict]]:
    """``"lora[r=4, alpha=16]|seq_bn"`` -> ``[("lora", {"r": 4, "alpha": 16}), ("seq_bn", {})]``.

    Values are Python literals (numbers, strings in quotes, lists, dicts, True/False/None).
    """
    members = []
    for chunk in text.split("|"):
        match = _CONFIG_STRING.match(chunk.strip())
        if not match:
            raise ValueError(f"invalid adapter config string {chunk.strip()!r}; "
                             "expected 'name' or 'name[key=value, ...]'")
        overrides_text = match.group("overrides") or ""
        literal = re.sub(r"(\w+)\s*=", r"'\1':", overrides_text)
        try:
            overrides = ast.literal_eval("{" + literal + "}")
        except (ValueError, SyntaxError) as error:
            raise ValueError(
                f"invalid overrides {overrides_text!r} in adapter config string {chunk.strip()!r}: {error}"
            ) from None
        members.append((match.group("name").strip(), overrides))
    return members


def _config_from_string(text: str) -> AdapterConfig:
    if text in ADAPTER_CONFIG_MAP:
        return ADAPTER_CONFIG_MAP[text]
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            try:
                loaded = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{text}: not a valid JSON adapter config: {error}") from None
        return _config_from_dict(loaded["config"] if "config" in loaded else loaded)
    configs = []
    for name, overrides in parse_config_string(text):
        if name not in ADAPTER_CONFIG_MAP:
            raise ValueError(
                f"could not identify {name!r} as an adapter configuration; known names: {sorted(ADAPTER_CONFIG_MAP)}"
            )
        configs.append(ADAPTER_CONFIG_MAP[name].replace(**overrides))
    return configs[0] if len(configs) == 1 else ConfigUnion(*configs)


# ----------------------------------------------------------------------------------------------------------------
# Config hash (the key of config.json's "config_map" and of "config_id"), computed as AdapterHub does
# ----------------------------------------------------------------------------------------------------------------

# Fields whose default value AdapterHub leaves out of the hash so that hashes stay equal across its versions.
_HASH_DROPPED_DEFAULTS = {
    "phm_layer": True,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "init_weights": "bert",
    "scaling": 1.0,
    "subtract_projection": True,
}


def _drop_falsy(value):
    if isinstance(value, Mapping):
        return {k: _drop_falsy(v) for k, v in value.items() if v}
    return value


def adapter_config_hash(config: Mapping, length: int = 16, ignore_params=()) -> str:
    """First ``length`` hex digits of the SHA-1 of the config's minimised, key-sorted JSON (AdapterHub's rule:
    falsy values dropped, the defaults in ``_HASH_DROPPED_DEFAULTS`` dropped, ``ignore_params`` dropped)."""
    # A union hashes over its flattened "<member index>.<key>" items, as AdapterHub's does.
    minimized = _drop_falsy({k: v for k, v in config.items() if k not in ignore_params})
    for name, default in _HASH_DROPPED_DEFAULTS.items():
        if name in minimized and minimized[name] == default:
            del minimized[name]
    for key, value in config.items():
        # DiReFT: keep the flag (AdapterHub hashes DiReFT like NoReFT, so one config could replace the other)
        if key.rsplit(".", 1)[-1] == "subtract_projection" and value is False and key not in ignore_params:
            minimized[key] = False
    digest = hashlib.sha1(json.dumps(minimized, sort_keys=True).encode("utf-8")).hexdigest()
    return digest[:length]
