"""The per-model record of adapters: name -> config, the active setup, and config.json's ``"adapters"`` section.

One ``AdapterRegistry`` belongs to one ``DebertaV2AdapterModel`` and is shared (by reference) with its adapter
layers, which ask it for their configs and the active setup. It is never stored on the transformers config object,
so two models built from one config never see each other's adapters.

The JSON form is AdapterHub's ``ModelAdaptersConfig``: ``{"adapters": {name: config_hash}, "config_map":
{config_hash: config_dict}, "fusions": {...}, "fusion_config_map": {...}, "fusion_name_map": {...}}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from .composition.fusion import ADAPTERFUSION_CONFIG_MAP, DEFAULT_ADAPTERFUSION_CONFIG, AdapterFusionConfig
from .configuration import ADAPTER_CONFIG_MAP, DEFAULT_ADAPTER_CONFIG, AdapterConfig, ConfigUnion, adapter_config_hash

__all__ = ["AdapterRegistry"]


class AdapterRegistry:
    """Adapter names and configs of one model (see module docstring).

    Fusions: ``fusions`` {fusion name: config name ("dynamic", "static") or hash}, ``fusion_config_map`` {hash:
    AdapterFusionConfig}, ``fusion_name_map`` {fusion name: adapter names} for fusions whose name is not the
    comma-joined adapter names. ``model_config`` and ``shared_parameters`` (the base model's ModuleDict of
    per-adapter shared tensors, e.g. PHM rules) are set by the model; layers read them.
    """

    def __init__(self):
        self.adapters: dict[str, str] = {}
        self.config_map: dict[str, AdapterConfig] = {}
        self.fusions: dict[str, str] = {}
        self.fusion_config_map: dict[str, AdapterFusionConfig] = {}
        self.fusion_name_map: dict[str, list] = {}
        self.active_setup = None
        self.skip_layers = None
        self.model_config = None
        self.shared_parameters = None

    def __contains__(self, name) -> bool:
        return name in self.adapters

    def __iter__(self):
        return iter(list(self.adapters))

    def __len__(self):
        return len(self.adapters)

    def get(self, name: str) -> AdapterConfig | None:
        """The config of adapter ``name`` (None if there is no such adapter)."""
        if name not in self.adapters:
            return None
        key = self.adapters[name]
        config = self.config_map.get(key, ADAPTER_CONFIG_MAP.get(key))
        if isinstance(config, str):
            config = ADAPTER_CONFIG_MAP[config]
        if config is None:
            raise ValueError(f"adapter {name!r} refers to config {key!r}, which is neither in config_map nor a "
                             "known name")
        return config

    def match(self, name: str, config_type: type, layer_idx: int | None = None, location_key: str | None = None):
        """The member config of ``name`` that is a ``config_type``, places a module at ``location_key`` (a config
        field such as ``"mh_adapter"`` or ``"selfattn_lora"``) and does not leave out ``layer_idx``; else None."""
        config = self.get(name)
        if config is None:
            return None
        members = config.configs if isinstance(config, ConfigUnion) else [config]
        found = []
        for member in members:
            if not isinstance(member, config_type):
                continue
            if layer_idx is not None and layer_idx in (member.get("leave_out") or []):
                continue
            if location_key is not None and not member.get(location_key, False):
                continue
            found.append(member)
        if len(found) > 1:
            raise ValueError(f"adapter {name!r} defines several {config_type.__name__} modules for {location_key} in "
                             f"layer {layer_idx}; use one module per location")
        return found[0] if found else None

    def add(self, name: str, config=None) -> AdapterConfig:
        """Record adapter ``name`` with ``config`` (an object, dict or name; None = the default seq_bn)."""
        if name in self.adapters:
            raise ValueError(f"An adapter with the name '{name}' has already been added.")
        config = AdapterConfig.load(config if config is not None else DEFAULT_ADAPTER_CONFIG)
        base = key = adapter_config_hash(config)
        # AdapterHub's hash ignores falsy values and some defaults, so different configs can share it (e.g.
        # shared_phm_rule=False vs True); AdapterHub then silently gives both adapters one config. Keep both.
        suffix = 1
        while key in self.config_map and self.config_map[key] != config:
            key = f"{base}-{suffix}"
            suffix += 1
        self.config_map[key] = config
        self.adapters[name] = key
        return config

    def remove(self, name: str) -> None:
        key = self.adapters.pop(name)
        if key in self.config_map and key not in self.adapters.values():
            del self.config_map[key]

    def replace_config(self, name: str, config: AdapterConfig) -> None:
        """Give adapter ``name`` a new config (e.g. flat=True after eject_prefix_tuning); its place in the order of
        adapters is kept."""
        order = list(self.adapters)
        self.remove(name)
        self.add(name, config)
        self.adapters = {n: self.adapters[n] for n in order}

    # ---- fusions ----------------------------------------------------------------------------------------------

    def get_fusion(self, fusion_name) -> tuple:
        """(AdapterFusionConfig, adapter names) of fusion ``fusion_name`` (a name or a list of adapter names), or
        (None, None)."""
        if isinstance(fusion_name, (list, tuple)):
            fusion_name = ",".join(fusion_name)
        if fusion_name not in self.fusions:
            return None, None
        key = self.fusions[fusion_name]
        config = self.fusion_config_map.get(key)
        config = AdapterFusionConfig.load(config if config is not None else key)
        names = list(self.fusion_name_map.get(fusion_name, fusion_name.split(",")))
        return config, names

    def add_fusion(self, adapter_names: list, config=None, fusion_name: str | None = None) -> str:
        """Record a fusion of ``adapter_names``; ``config``: a name ("dynamic" default, "static"), a dict or an
        AdapterFusionConfig. Returns the fusion name."""
        if fusion_name is None:
            fusion_name = ",".join(adapter_names)
        if fusion_name in self.fusions:
            raise ValueError(f"An AdapterFusion with the name '{fusion_name}' has already been added.")
        self.fusion_name_map[fusion_name] = list(adapter_names)
        if config is None:
            config = DEFAULT_ADAPTERFUSION_CONFIG
        if isinstance(config, str) and config in ADAPTERFUSION_CONFIG_MAP:
            key = config
        elif isinstance(config, str) and config in self.fusion_config_map:
            key = config
        else:
            resolved = AdapterFusionConfig.load(config)
            key = adapter_config_hash(resolved)
            self.fusion_config_map[key] = resolved
        self.fusions[fusion_name] = key
        return fusion_name

    def remove_fusion(self, fusion_name: str) -> None:
        key = self.fusions.pop(fusion_name)
        self.fusion_name_map.pop(fusion_name, None)
        if key in self.fusion_config_map and key not in self.fusions.values():
            del self.fusion_config_map[key]

    def common_config_value(self, adapter_names: list, attribute: str):
        """The value of config field ``attribute`` shared by all ``adapter_names`` (ValueError if they differ)."""
        common = None
        for i, name in enumerate(adapter_names):
            config = self.get(name)
            if config is None:
                raise ValueError(f"No adapter with name '{name}' found. Make sure that an adapter with this name is "
                                 "loaded.")
            value = _field(config, attribute)
            if i > 0 and value != common:
                raise ValueError(f"All given adapters must define the same value for config attribute {attribute}.")
            common = value
        return common

    def to_dict(self) -> dict:
        return {
            "adapters": dict(self.adapters),
            "config_map": {k: v.to_dict() if isinstance(v, AdapterConfig) else copy.deepcopy(v)
                           for k, v in self.config_map.items()},
            "fusions": dict(self.fusions),
            "fusion_config_map": {k: v.to_dict() if isinstance(v, AdapterConfig) else copy.deepcopy(v)
                                  for k, v in self.fusion_config_map.items()},
            "fusion_name_map": copy.deepcopy(self.fusion_name_map),
        }

    @classmethod
    def from_dict(cls, data: Mapping | None) -> AdapterRegistry:
        registry = cls()
        if not data:
            return registry
        for name, value in data.get("adapters", {}).items():
            # adapter-transformers 1.x stored (type, config_name) pairs
            registry.adapters[name] = value[1] or value[0] if isinstance(value, (list, tuple)) else value
        registry.config_map = {k: AdapterConfig.load(v) for k, v in data.get("config_map", {}).items()}
        registry.fusions = dict(data.get("fusions", {}))
        registry.fusion_config_map = {k: AdapterFusionConfig.load(v)
                                      for k, v in data.get("fusion_config_map", {}).items()}
        registry.fusion_name_map = copy.deepcopy(data.get("fusion_name_map", {}))
        return registry


def _field(config, attribute: str):
    """config[attribute] for a method config; for a union, the value of the member that has the field (None if
    none has it)."""
    if isinstance(config, ConfigUnion):
        values = [c.get(attribute) for c in config.configs if attribute in c]
        return values[0] if values else None
    return config.get(attribute)
