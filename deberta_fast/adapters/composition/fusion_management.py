"""AdapterFusion management on DebertaV2AdapterModel: AdapterHub 1.3.0's add / delete / train / regularise API.

A fusion is recorded in the model's registry (config.json's "fusions", "fusion_config_map", "fusion_name_map") and
gets one AdapterFusionLayer (fusion.py) in every bottleneck location where its adapters have modules. Saving and
loading fusions lives in persistence/adapter_io.py.
"""

from __future__ import annotations

import logging
import warnings

from .blocks import Fuse, parse_composition
from .fusion import fusion_regularization_loss

logger = logging.getLogger("deberta_fast")

__all__ = ["FusionManagementMixin", "fusion_name_of"]


def fusion_name_of(adapter_names) -> str:
    """The fusion name of a Fuse block, a list of adapter names, or a name ("a,b")."""
    if isinstance(adapter_names, Fuse):
        return adapter_names.name
    if isinstance(adapter_names, (list, tuple)):
        return ",".join(adapter_names)
    if isinstance(adapter_names, str):
        return adapter_names
    raise ValueError(f"Invalid AdapterFusion definition: {adapter_names}")


class FusionManagementMixin:
    """AdapterFusion API for a model with ``adapters_config`` (AdapterRegistry) and adapter layers."""

    def add_adapter_fusion(self, adapter_names, config=None, name: str | None = None, overwrite_ok: bool = False,
                           set_active: bool = False) -> None:
        """Add an AdapterFusion of ``adapter_names`` (a Fuse block, a list of names or "a,b"). ``config``:
        "dynamic" (default), "static", a dict or an AdapterFusionConfig; ``name`` defaults to the Fuse block's name
        or the comma-joined adapter names."""
        if isinstance(adapter_names, Fuse):
            name = name or adapter_names.name
            adapter_names = list(adapter_names.children)
        elif isinstance(adapter_names, str):
            adapter_names = adapter_names.split(",")
        else:
            adapter_names = list(adapter_names)
        if not adapter_names or not all(isinstance(n, str) and n for n in adapter_names):
            raise ValueError(f"add_adapter_fusion: adapter_names must name adapters; got {adapter_names!r}")
        name = name or ",".join(adapter_names)
        for adapter in adapter_names:
            self._require_adapter(adapter)
        if self.adapters_config.get_fusion(name)[0] is not None:
            if not overwrite_ok:
                raise ValueError(f"An AdapterFusion with the name '{name}' has already been added.")
            self.delete_adapter_fusion(name)
        self.adapters_config.add_fusion(adapter_names, config=config, fusion_name=name)
        try:
            self.apply_to_adapter_layers(lambda i, layer: layer.add_fusion_layer(name))
        except Exception:
            self.delete_adapter_fusion(name)
            raise
        if set_active:
            self.set_active_adapters(Fuse(*adapter_names, name=name))

    def delete_adapter_fusion(self, adapter_names) -> None:
        """Remove an AdapterFusion (a Fuse block, a list of names or its name); unknown fusions are skipped."""
        name = fusion_name_of(adapter_names)
        if name not in self.adapters_config.fusions:
            logger.info("No AdapterFusion '%s' found for deletion. Skipping.", name)
            return
        self.adapters_config.remove_fusion(name)
        self.apply_to_adapter_layers(lambda i, layer: layer.delete_fusion_layer(name))
        active = self.active_adapters
        if isinstance(active, Fuse) and active.name == name or (
                active is not None and len(active) == 1 and isinstance(active[0], Fuse) and active[0].name == name):
            self.adapters_config.active_setup = None

    def train_adapter_fusion(self, adapter_setup, unfreeze_adapters: bool = False) -> None:
        """Train mode; freeze the base model; unfreeze the fusion layers of the setup's Fuse blocks (and, with
        ``unfreeze_adapters``, the fused adapters); activate the setup. Active heads train, as in train_adapter."""
        setup = parse_composition(adapter_setup)
        if setup is None:
            raise ValueError("train_adapter_fusion needs a Fuse setup; got nothing")
        for name in setup.flatten():
            self._require_adapter(name)
        self.train()
        self.freeze_model(True)
        self.apply_to_adapter_layers(lambda i, layer: layer.enable_adapters(setup, unfreeze_adapters, True))
        self.apply_to_basemodel_childs(lambda i, child: child.enable_adapters(setup, unfreeze_adapters, True))
        if unfreeze_adapters:
            for name in setup.flatten():
                if name in self.deberta.shared_parameters:
                    for param in self.deberta.shared_parameters[name].values():
                        param.requires_grad = True
        self.set_active_adapters(setup)
        self._train_heads_and_embeddings(False)

    def train_fusion(self, adapter_setup, unfreeze_adapters: bool = False) -> None:
        """Deprecated name of train_adapter_fusion (adapter-transformers 2.x)."""
        warnings.warn("train_fusion() is deprecated; use train_adapter_fusion()", FutureWarning, stacklevel=2)
        self.train_adapter_fusion(adapter_setup, unfreeze_adapters=unfreeze_adapters)

    def _fusion_layers(self, name: str | None = None) -> list:
        layers = []
        for _, layer in self.iter_layers():
            for module in layer.modules():
                for fusion_name, fusion in getattr(module, "adapter_fusion_layer", {}).items():
                    if name is None or fusion_name == name:
                        layers.append(fusion)
        return layers

    def get_fusion_regularization_loss(self):
        """0.01 · Σ_layers ‖I − W_value‖² over the fusion layers whose value matrix trains (None if none does)."""
        return fusion_regularization_loss(self._fusion_layers(), self.config.hidden_size)

    def adapter_fusion_to(self, adapter_names, device=None, dtype=None) -> None:
        """Move the fusion layers of ``adapter_names`` to ``device`` / ``dtype``."""
        for fusion in self._fusion_layers(fusion_name_of(adapter_names)):
            fusion.to(device=device, dtype=dtype)
