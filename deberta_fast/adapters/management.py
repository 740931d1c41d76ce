"""Adapter lifecycle, activation, training, merging, averaging and introspection for DebertaV2AdapterModel.

Method names, signatures and defaults follow AdapterHub 1.3.0's ``ModelAdaptersMixin``; the model keeps its
adapters' configs in ``self.adapters_config`` (an AdapterRegistry) and its adapter-holding modules inside
``self.deberta`` (see injection.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch.nn as nn

from .composition.blocks import MultiTask, Stack, parse_composition
from .configuration import (
    AdapterConfig,
    BnConfig,
    ConfigUnion,
    LoRAConfig,
    MTLLoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    ReftConfig,
    adapter_config_hash,
)
from .layer_base import AdapterLayerBase
from .methods.bottleneck import bottleneck_size
from .methods.lora import LoRALinear
from .methods.phm import shared_phm_parameters
from .methods.vera import is_vera, shared_vera_parameters
from .summary import format_summary

logger = logging.getLogger("deberta_fast")

__all__ = ["AdapterManagementMixin", "unsupported_reasons"]

# Method types supports_adapter() answers for (AdapterHub's AdapterMethod names).
_RUNNABLE_TYPES = {"bottleneck", "lora", "prefix_tuning", "prompt_tuning", "reft", "mtl_lora", "invertible"}
_KNOWN_TYPES = {"bottleneck", "lora", "prefix_tuning", "prompt_tuning", "reft", "invertible", "mtl_lora"}


def unsupported_reasons(config: AdapterConfig) -> list[str]:
    """Why this version of deberta_fast cannot run ``config`` (empty when it can)."""
    members = config.configs if isinstance(config, ConfigUnion) else [config]
    reasons = []
    for member in members:
        if isinstance(member, LoRAConfig):
            if isinstance(member, MTLLoRAConfig) and member.composition_mode == "add" and (
                    member.use_dora or is_vera(member)):
                reasons.append("MTL-LoRA cannot be combined with DoRA or VeRA (AdapterHub cannot build it either)")
            if is_vera(member) and (member.vera_d is None or member.vera_b is None):
                reasons.append("VeRA needs both vera_d and vera_b")
            if member.use_dora and member.composition_mode == "scale":
                reasons.append("(IA)³ (composition_mode='scale') does not support DoRA")
            if member.composition_mode not in ("add", "scale"):
                reasons.append(f"unknown composition_mode {member.composition_mode!r} (expected 'add' or 'scale')")
            unknown = sorted(set(member.attn_matrices) - {"q", "k", "v"})
            if unknown:
                reasons.append(f"attn_matrices {unknown} are not DeBERTa projections (expected a subset of q, k, v)")
        elif isinstance(member, BnConfig):
            if member.inv_adapter and member.inv_adapter not in ("nice", "glow"):
                reasons.append(f"unknown inv_adapter {member.inv_adapter!r} (expected 'nice' or 'glow')")
            if member.cross_adapter:
                reasons.append("cross-attention adapters do not exist in DeBERTa")
            if member.stochastic_depth:
                reasons.append("stochastic_depth is not implemented")
        elif not isinstance(member, (PrefixTuningConfig, PromptTuningConfig, ReftConfig)):
            reasons.append(f"{type(member).__name__} ({member.architecture}) is not implemented")
    return reasons


class AdapterManagementMixin:
    """AdapterHub's adapter API on a model with ``deberta`` (base model), ``adapters_config`` and ``heads``."""

    # ---- iteration --------------------------------------------------------------------------------------------

    def iter_layers(self) -> Iterable[tuple[int, nn.Module]]:
        """(index, DebertaV2Layer) for every encoder layer."""
        yield from enumerate(self.deberta.encoder.layer)

    def apply_to_adapter_layers(self, fn) -> None:
        """fn(layer_index, module) for every adapter-holding module, in AdapterHub's order within a layer (q, k, v,
        attention output, intermediate, output, output.dense)."""
        for i, layer in self.iter_layers():
            for module in layer.modules():
                if isinstance(module, AdapterLayerBase):
                    fn(i, module)

    def apply_to_basemodel_childs(self, fn) -> None:
        """fn(-1, child) for adapter modules attached directly to the base model (prompt tuning)."""
        for child in self.deberta.children():
            if isinstance(child, AdapterLayerBase):
                fn(-1, child)

    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def supports_adapter(self, type_or_config) -> bool:
        """Whether this model can run an adapter method (a name such as "lora") or a config."""
        if isinstance(type_or_config, str):
            if type_or_config not in _KNOWN_TYPES:
                raise ValueError(f"unknown adapter method {type_or_config!r}; known: {sorted(_KNOWN_TYPES)}")
            return type_or_config in _RUNNABLE_TYPES
        return not unsupported_reasons(AdapterConfig.load(type_or_config))

    def has_adapters(self) -> bool:
        return len(self.adapters_config.adapters) > 0

    def add_adapter(self, adapter_name: str, config=None, overwrite_ok: bool = False, set_active: bool = False):
        """Add adapter ``adapter_name``. ``config``: a name from ADAPTER_CONFIG_MAP (optionally with overrides,
        "lora[r=4, alpha=16]"), a dict, an AdapterConfig, a JSON path, or None for "seq_bn"."""
        _check_name(adapter_name, "adapter_name")
        config = AdapterConfig.load(config if config is not None else "seq_bn")
        reasons = unsupported_reasons(config)
        if reasons:
            raise ValueError(f"Adapter config or type '{config}' is not supported by this model: " + "; ".join(reasons))
        if adapter_name in self.adapters_config and not overwrite_ok:
            raise ValueError(f"An adapter with the name '{adapter_name}' has already been added. "
                             "Use overwrite_ok=True to replace it.")
        if overwrite_ok and adapter_name in self.adapters_config:
            self.delete_adapter(adapter_name)
        self.adapters_config.add(adapter_name, config)
        try:
            self._add_adapter_weights(adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def _add_adapter_weights(self, adapter_name: str) -> None:
        added = []
        try:
            self.apply_to_adapter_layers(lambda i, layer: added.append(layer.add_adapter(adapter_name, i)))
            self.apply_to_basemodel_childs(lambda i, child: added.append(child.add_adapter(adapter_name, i)))
            self._add_shared_parameters(adapter_name)
            reference = self.get_input_embeddings().weight
            self.deberta.prefix_tuning.confirm_prefix(adapter_name, device=reference.device, dtype=reference.dtype)
        finally:
            self.deberta.prefix_tuning.discard_counts(adapter_name)
        if not any(added):
            raise ValueError(f"adapter {adapter_name!r}: its config places no module in any layer (check leave_out, "
                             "attn_matrices and the location flags)")

    def _add_shared_parameters(self, adapter_name: str) -> None:
        """Compacter: the PHM rule / weights shared by all layers of the adapter (``shared_parameters.<name>``);
        VeRA: its frozen random matrices (methods/vera.py)."""
        self._add_shared_vera_parameters(adapter_name)
        config = self.adapters_config.match(adapter_name, BnConfig, location_key="phm_layer")
        if config is None or not (config["shared_phm_rule"] or config["shared_W_phm"]):
            return
        reference = self.get_input_embeddings().weight
        down = bottleneck_size(self.config.hidden_size, config["reduction_factor"], 0)
        self.deberta.shared_parameters[adapter_name] = shared_phm_parameters(
            config, self.config.hidden_size, down, device=reference.device, dtype=reference.dtype)

    def _add_shared_vera_parameters(self, adapter_name: str) -> None:
        config = self.adapters_config.match(adapter_name, LoRAConfig)
        if config is None or not is_vera(config) or config.composition_mode != "add" or isinstance(
                config, MTLLoRAConfig):
            return
        layers = [m for m in self._lora_layers() if adapter_name in m.loras]
        if not layers:
            return
        shapes = {(m.in_features, m.out_features) for m in layers}
        if len(shapes) > 1:
            raise ValueError(f"VeRA adapter {adapter_name!r} shares one pair of random matrices across its layers, "
                             f"so every adapted linear needs the same (in, out) shape; got {sorted(shapes)} (keep "
                             "VeRA on the attention projections, e.g. intermediate_lora=False, output_lora=False)")
        first = layers[0]
        self.deberta.shared_parameters[adapter_name] = shared_vera_parameters(
            config, (config.r, first.in_features), (first.out_features, config.r), device=first.weight.device,
            dtype=first.loras[adapter_name].vera_D.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (a merged LoRA is unmerged first); unknown names are skipped."""
        if adapter_name not in self.adapters_config:
            logger.info("No adapter '%s' found for deletion. Skipping.", adapter_name)
            return
        self.apply_to_adapter_layers(lambda i, layer: layer.delete_adapter(adapter_name))
        self.apply_to_basemodel_childs(lambda i, child: child.delete_adapter(adapter_name))
        self.deberta.prefix_tuning.delete_prefix(adapter_name)
        if adapter_name in self.deberta.shared_parameters:
            del self.deberta.shared_parameters[adapter_name]
        self.adapters_config.remove(adapter_name)
        if self.active_adapters == Stack(adapter_name):
            self.adapters_config.active_setup = None

    def get_adapter(self, name: str) -> dict:
        """{layer index: {location key: module, or a ModuleList when several modules share the location}}; index
        -1 holds the model-level parts ("shared": Compacter's shared PHM tensors, "prompt": a prompt)."""
        destination = defaultdict(dict)
        if name in self.deberta.shared_parameters:
            destination[-1]["shared"] = self.deberta.shared_parameters[name]
        prompt = self.deberta.prompt_tuning.get_adapter(name)
        if prompt is not None:
            destination[-1]["prompt"] = prompt
        invertible = self.deberta.invertible_adapters.get_adapter(name)
        if invertible is not None:
            destination[-1]["invertible"] = invertible
        for i, layer in self.iter_layers():
            for module in layer.modules():
                if isinstance(module, AdapterLayerBase) and module.get_adapter(name) is not None:
                    found = module.get_adapter(name)
                    previous = destination[i].get(module.location_key)
                    if previous is None:
                        destination[i][module.location_key] = found
                    elif isinstance(previous, nn.ModuleList):
                        previous.append(found)
                    else:
                        destination[i][module.location_key] = nn.ModuleList([previous, found])
        return dict(destination)

    def adapter_to(self, name: str, device=None, dtype=None) -> None:
        """Move adapter ``name`` (and its head, if any) to ``device`` / ``dtype``."""
        self._require_adapter(name)
        for modules in self.get_adapter(name).values():
            for module in modules.values():
                module.to(device=device, dtype=dtype)
        if name in self.heads:
            self.heads[name].to(device=device, dtype=dtype)

    def _require_adapter(self, name: str) -> None:
        if name not in self.adapters_config:
            raise ValueError(f"No adapter with name '{name}' found. Added adapters: {list(self.adapters_config)}")

    # ---- activation -------------------------------------------------------------------------------------------

    @property
    def active_adapters(self):
        return self.adapters_config.active_setup

    @active_adapters.setter
    def active_adapters(self, adapter_setup):
        self.set_active_adapters(adapter_setup)

    @property
    def has_parallel_adapters(self) -> bool:
        setup = self.adapters_config.active_setup
        return bool(setup) and setup.parallel_channels > 1

    def set_active_adapters(self, adapter_setup, skip_layers=None) -> None:
        """Run ``adapter_setup`` (a name, a composition block, or None) in every forward; merged LoRAs are reset
        first. The head named after the setup's last adapter becomes the active head if it exists."""
        setup = parse_composition(adapter_setup, model_type=self.config.model_type)
        if setup is not None:
            for name in setup.flatten():
                if name not in self.adapters_config:
                    raise ValueError(f"No adapter with name '{name}' found. Please make sure that all specified "
                                     f"adapters are correctly loaded. Added adapters: {list(self.adapters_config)}")
        self.reset_adapter()
        self.adapters_config.active_setup = setup
        self.adapters_config.skip_layers = tuple(skip_layers) if skip_layers is not None else None
        if setup is not None:
            self._activate_head_for_setup(setup)

    # ---- training ---------------------------------------------------------------------------------------------

    def freeze_model(self, freeze: bool = True) -> None:
        """Set requires_grad = not freeze on every base-model parameter (adapters included; heads untouched)."""
        for param in self.deberta.parameters():
            param.requires_grad = not freeze
        self.model_frozen = freeze

    def train_adapter(self, adapter_setup, train_embeddings: bool = False) -> None:
        """Train mode; freeze the base model; unfreeze the adapters of ``adapter_setup`` and activate it. Heads
        other than the active one(s) are frozen, the active head trains (its tied decoder only with
        ``train_embeddings``, which also unfreezes the word embeddings)."""
        setup = parse_composition(adapter_setup)
        if setup is None:
            raise ValueError("train_adapter needs an adapter name or composition block; got nothing")
        for name in setup.flatten():
            self._require_adapter(name)
        self.train()
        self.freeze_model(True)
        self.apply_to_adapter_layers(lambda i, layer: layer.enable_adapters(setup, True, False))
        self.apply_to_basemodel_childs(lambda i, child: child.enable_adapters(setup, True, False))
        for name in setup.flatten():
            if name in self.deberta.shared_parameters:
                # VeRA's shared random matrices stay frozen (AdapterHub's rule); Compacter's shared PHM train
                lora = self.adapters_config.match(name, LoRAConfig)
                trainable = not (lora is not None and is_vera(lora))
                for param in self.deberta.shared_parameters[name].values():
                    param.requires_grad = trainable
        self.set_active_adapters(setup)
        self._train_heads_and_embeddings(train_embeddings)

    def _train_heads_and_embeddings(self, train_embeddings: bool) -> None:
        active_heads = set(self._active_head_names())
        for name, head in self.heads.items():
            for param in head.parameters():
                param.requires_grad = name in active_heads
        if train_embeddings:
            embeddings = self.get_input_embeddings()
            embeddings.train()
            embeddings.weight.requires_grad = True
        else:
            self.freeze_embeddings()

    def freeze_embeddings(self, freeze: bool = True) -> None:
        """requires_grad = not freeze on the active heads' output embeddings (the tied masked-LM decoder)."""
        embeddings = self.get_output_embeddings()
        for module in embeddings if isinstance(embeddings, list) else [embeddings]:
            if module is not None:
                for param in module.parameters():
                    param.requires_grad = not freeze

    # ---- merge / reset ----------------------------------------------------------------------------------------

    def merge_adapter(self, name: str) -> None:
        """Fold LoRA-family adapter ``name`` into the base weights (``W += s·B A``; (IA)³ scales W and b; DoRA,
        VeRA, MTL-LoRA: adapters/methods/). The forward then costs a plain linear in those layers;
        ``reset_adapter`` restores the weights exactly."""
        self._require_adapter(name)
        layers = [m for m in self._lora_layers() if name in m.loras]
        if not layers:
            raise ValueError(f"merge_adapter: adapter '{name}' has no LoRA / (IA)³ modules; only those can be merged")
        merged = []
        try:
            for layer in layers:
                layer.merge_adapter(name)
                merged.append(layer)
        except ValueError:
            for layer in merged:
                layer.reset_adapter()
            raise

    def reset_adapter(self) -> None:
        """Undo every ``merge_adapter``: weights return to their exact values from before the merge."""
        for layer in self._lora_layers():
            layer.reset_adapter()

    # ---- averaging --------------------------------------------------------------------------------------------

    def average_adapter(self, adapter_name: str, adapter_list, weights=None, combine_strategy: str = "linear",
                        normalize_weights: bool = True, overwrite_ok: bool = False, set_active: bool = False,
                        svd_rank=None) -> None:
        """Add ``adapter_name`` whose every tensor is Σ w_i·tensor_i over ``adapter_list`` (a list of names, or a
        {name: weight} dict). weights default to equal; normalised to sum 1 unless ``normalize_weights=False``.
        combine_strategy: "linear" or "lora_linear_only_negate_b" (lora_A gets |w|, lora_B gets w)."""
        strategies = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
        if combine_strategy not in strategies:
            raise ValueError(f"Invalid combine_strategy '{combine_strategy}'. Must be one of {list(strategies)}")
        if combine_strategy == "lora_delta_w_svd":
            raise ValueError("This model specifically does not support 'lora_delta_w_svd' as a merging method. "
                             "Please use a different combine_strategy or a different model.")
        if isinstance(adapter_list, Mapping):
            if weights is None:
                weights = list(adapter_list.values())
            adapter_list = list(adapter_list)
        adapter_list = list(adapter_list)
        if not adapter_list:
            raise ValueError("No adapters to average. Please provide at least one adapter to average.")
        for name in adapter_list:
            self._require_adapter(name)
        config = self.adapters_config.get(adapter_list[0])
        reference = adapter_config_hash(config, ignore_params=["dropout", "init_weights"])
        for name in adapter_list[1:]:
            other = adapter_config_hash(self.adapters_config.get(name), ignore_params=["dropout", "init_weights"])
            if other != reference:
                raise ValueError("Cannot average adapters with different configurations. "
                                 "Please make sure all adapters have the same configuration.")
        if weights is None:
            weights = [1.0 / len(adapter_list)] * len(adapter_list)
        elif len(weights) != len(adapter_list):
            raise ValueError(f"weights has {len(weights)} entries for {len(adapter_list)} adapters")
        elif normalize_weights:
            total = sum(weights)
            if total == 0:
                raise ValueError("the weights sum to 0 and cannot be normalised; pass normalize_weights=False")
            weights = [w / total for w in weights]
        if svd_rank is not None:
            logger.warning("svd_rank is only used by 'lora_delta_w_svd'; ignoring it")
        if adapter_name in self.adapters_config:
            if not overwrite_ok:
                raise ValueError(f"An adapter with the name '{adapter_name}' has already been added. "
                                 "Use overwrite_ok=True to replace it.")
            self.delete_adapter(adapter_name)
        self.adapters_config.add(adapter_name, config)
        input_adapters = dict(zip(adapter_list, weights))
        reference = self.get_input_embeddings().weight
        try:
            self.apply_to_adapter_layers(
                lambda i, layer: layer.average_adapter(adapter_name, input_adapters, combine_strategy))
            self.apply_to_basemodel_childs(
                lambda i, child: child.average_adapter(adapter_name, input_adapters, combine_strategy))
            lora = self.adapters_config.match(adapter_name, LoRAConfig)
            if lora is not None and is_vera(lora) and combine_strategy != "linear":
                raise ValueError("VeRA only supports linear averaging. The combine_strategy must be 'linear'.")
            if self.adapters_config.match(adapter_name, BnConfig, location_key="phm_layer") is not None:
                self._average_shared_parameters(adapter_name, input_adapters, combine_strategy)
            elif lora is not None and is_vera(lora):
                self._average_shared_parameters(adapter_name, input_adapters, combine_strategy)
                for param in self.deberta.shared_parameters[adapter_name].values():
                    param.requires_grad = False
            self.deberta.prefix_tuning.average_prefix(adapter_name, input_adapters, combine_strategy,
                                                      device=reference.device, dtype=reference.dtype)
        except Exception:
            self.deberta.prefix_tuning.discard_counts(adapter_name)
            self.delete_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    def _average_shared_parameters(self, adapter_name: str, input_adapters: dict, combine_strategy: str) -> None:
        if combine_strategy != "linear":
            raise ValueError(f"Combine strategy {combine_strategy} not supported for shared parameters. Only "
                             "'linear' is supported.")
        shared = self.deberta.shared_parameters
        total = {}
        for name, weight in input_adapters.items():
            if name not in shared:
                raise ValueError(f"Adapter {name} not found in shared parameters.")
            for key, value in shared[name].items():
                total[key] = total[key] + weight * value if key in total else weight * value
        shared[adapter_name] = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in total.items()})

    # ---- MTL-LoRA parameter sharing ----------------------------------------------------------------------------

    def share_parameters(self, adapter_names, name: str | None = None, reference_adapter_name: str | None = None):
        """Make the MTL-LoRA adapters ``adapter_names`` (a MultiTask block, a list, or "a,b") use one copy of
        ``lora_A`` / ``lora_B`` per layer, starting from ``reference_adapter_name``'s values (default: the first).
        The copies live in each layer's ``shared_parameters[name]`` (default name: the names joined by ",")."""
        adapter_names = _names_of(adapter_names)
        if not adapter_names:
            raise ValueError("Expected at least one adapter name, but got an empty list.")
        name = name if name is not None else ",".join(adapter_names)
        reference_adapter_name = reference_adapter_name or adapter_names[0]
        configs = []
        for adapter in adapter_names:
            config = self.adapters_config.get(adapter)
            if config is None:
                raise ValueError(f"No configuration found for adapter '{adapter}'.")
            if not isinstance(config, MTLLoRAConfig):
                raise TypeError(f"Expected adapter configuration of type 'MultiTaskConfig' (MTLLoRAConfig) for "
                                f"adapter '{adapter}', but got '{type(config).__name__}' instead.")
            configs.append(config)
        if len({type(c) for c in configs}) > 1:
            raise TypeError("All adapter configurations must be of the same type, but found multiple types: "
                            f"{sorted({type(c).__name__ for c in configs})}")
        if reference_adapter_name not in adapter_names:
            raise ValueError(f"Reference adapter '{reference_adapter_name}' not found in the provided adapter "
                             f"names: {adapter_names}.")
        for layer in self._lora_layers():
            layer.share_parameters(name, adapter_names, reference_adapter_name)

    def unshare_parameters(self, adapter_names, name: str | None = None) -> None:
        """Undo ``share_parameters``: every adapter keeps the shared values as its own copy."""
        adapter_names = _names_of(adapter_names)
        name = name if name is not None else ",".join(adapter_names)
        for layer in self._lora_layers():
            layer.unshare_parameters(name)

    def eject_prefix_tuning(self, name: str) -> None:
        """Turn prefix tuning ``name`` from its MLP form into the flat form (the prefixes as one parameter; same
        output) and record flat=True in its config, so it saves and reloads as the flat form."""
        self._require_adapter(name)
        group = self.deberta.prefix_tuning.get_prefix(name)
        if group is None:
            raise ValueError(f"eject_prefix_tuning: adapter '{name}' has no prefix tuning")
        config = self.adapters_config.get(name)
        member = self.adapters_config.match(name, PrefixTuningConfig)
        group.eject(member)
        if not member.flat:
            flat = member.replace(flat=True)
            if isinstance(config, ConfigUnion):
                new_config = ConfigUnion(*[flat if c is member else c for c in config.configs])
            else:
                new_config = flat
            self.adapters_config.replace_config(name, new_config)

    # ---- introspection ----------------------------------------------------------------------------------------

    def adapter_summary(self, as_dict: bool = False):
        """AdapterHub's table (or, with ``as_dict``, its rows as dicts) of every adapter (see summary.py)."""
        rows = []
        active = self.active_adapters.flatten() if self.active_adapters is not None else set()
        for name in self.adapters_config:
            config = self.adapters_config.get(name)
            params = [p for modules in self.get_adapter(name).values() for m in modules.values()
                      for p in m.parameters()]
            rows.append({
                "name": name,
                "architecture": config.get("architecture", None) or "bottleneck",
                "#param": sum(p.numel() for p in params),
                "active": name in active,
                "train": all(p.requires_grad for p in params),
            })
        base_params = sum(p.numel() for p in self.deberta.parameters()) - sum(r["#param"] for r in rows)
        for row in rows:
            row["%param"] = row["#param"] / base_params * 100
        rows.append({"name": "Full model", "#param": base_params, "%param": 100.0,
                     "train": not getattr(self, "model_frozen", False)})
        return rows if as_dict else format_summary(rows)


def _names_of(adapter_names) -> list:
    if isinstance(adapter_names, MultiTask):
        return list(adapter_names.children)
    if isinstance(adapter_names, str):
        return adapter_names.split(",")
    return list(adapter_names)


def _check_name(name, argument: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{argument} must be a non-empty string; got {name!r}")
    if "." in name:
        raise ValueError(f"{argument} {name!r} may not contain '.' (it separates state-dict key parts)")

