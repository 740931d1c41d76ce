"""``save_adapter_setup`` / ``load_adapter_setup``: a composition setup, its adapters, fusions and heads in one
directory, in AdapterHub 1.3.0's layout:

    <dir>/adapter_setup.json    {"adapter_setup": <block.to_dict()>, "head_setup": <name | list | block dict | true
                                 | null>, "version": "adapters.1.3.0"}
    <dir>/<adapter>/            save_adapter(..., with_head=True) of every adapter the setup names
    <dir>/<a,b>/                save_adapter_fusion of a Fuse block at the top level or one level down
    <dir>/<head>/               save_head of every head of head_setup (head_setup=True: the only head, in <dir>)

Loading adds the adapters, fusions and heads (the adapter directories' own heads too) and, with ``set_active``,
activates the setup and the head setup; it returns (adapter_setup, head_setup).
"""

from __future__ import annotations

import os

from ..composition.blocks import AdapterCompositionBlock, Fuse, parse_composition
from . import files

__all__ = ["SETUP_CONFIG_NAME", "AdapterSetupIOMixin"]

SETUP_CONFIG_NAME = "adapter_setup.json"


def _fusions_of(setup: AdapterCompositionBlock) -> list:
    found = [setup] if isinstance(setup, Fuse) else []
    found += [child for child in setup.children if isinstance(child, Fuse)]
    return found


def _head_names(head_setup) -> list:
    if isinstance(head_setup, AdapterCompositionBlock):
        return sorted(head_setup.flatten())
    if isinstance(head_setup, (list, tuple)):
        return list(head_setup)
    if isinstance(head_setup, str):
        return [head_setup]
    return []


class AdapterSetupIOMixin:
    """save_adapter_setup / load_adapter_setup (module docstring) on an adapter model with flexible heads."""

    def save_adapter_setup(self, save_directory: str, adapter_setup, head_setup=None, meta_dict: dict = None,
                           custom_weights_loaders=None, use_safetensors: bool = False) -> None:
        setup = parse_composition(adapter_setup, model_type=self.config.model_type)
        if setup is None:
            raise ValueError("save_adapter_setup: adapter_setup names no adapter")
        for name in setup.flatten():
            if name not in self.adapters_config:
                raise ValueError(f"save_adapter_setup: no adapter named {name!r}; added adapters: "
                                 f"{list(self.adapters_config)}")
        heads = _head_names(head_setup)
        missing_heads = [h for h in heads if h not in self.heads]
        if missing_heads:
            raise ValueError(f"save_adapter_setup: no head named {missing_heads}; heads: {list(self.heads)}")
        if head_setup is True and len(self.heads) != 1:
            raise ValueError(f"save_adapter_setup: head_setup=True saves the model's only head, but it has "
                             f"{len(self.heads)} heads ({list(self.heads)}); name them instead")
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory}: exists and is not a directory")
        os.makedirs(save_directory, exist_ok=True)
        for name in sorted(setup.flatten()):
            self.save_adapter(os.path.join(save_directory, name), name, meta_dict=meta_dict,
                              custom_weights_loaders=custom_weights_loaders, use_safetensors=use_safetensors)
        for fusion in _fusions_of(setup):
            self.save_adapter_fusion(os.path.join(save_directory, fusion.name), fusion, meta_dict=meta_dict,
                                     custom_weights_loaders=custom_weights_loaders, use_safetensors=use_safetensors)
        if head_setup is True:
            self.save_head(save_directory, use_safetensors=use_safetensors)
        for head in heads:
            self.save_head(os.path.join(save_directory, head), head, use_safetensors=use_safetensors)
        # written last: a directory with adapter_setup.json holds everything it names
        files.write_json(os.path.join(save_directory, SETUP_CONFIG_NAME), {
            "adapter_setup": setup.to_dict(),
            "head_setup": head_setup.to_dict() if isinstance(head_setup, AdapterCompositionBlock) else head_setup,
            "version": files.FORMAT_VERSION,
        })

    def load_adapter_setup(self, adapter_setup_name_or_path: str, version: str = None, custom_weights_loaders=None,
                           set_active: bool = False, use_safetensors: bool = False, **kwargs):
        """-> (adapter_setup, head_setup) read from ``adapter_setup_name_or_path`` (module docstring)."""
        if version is not None or kwargs:
            raise ValueError("load_adapter_setup: deberta_fast loads setups from a local directory only (version / "
                             f"download arguments {sorted(kwargs) + (['version'] if version else [])} are not used)")
        directory = adapter_setup_name_or_path
        config = files.read_json(os.path.join(directory, SETUP_CONFIG_NAME))
        if "adapter_setup" not in config:
            raise ValueError(f"{directory}/{SETUP_CONFIG_NAME}: no 'adapter_setup' entry")
        setup = AdapterCompositionBlock.from_dict(config["adapter_setup"])
        head_setup = config.get("head_setup")
        if isinstance(head_setup, dict):
            head_setup = AdapterCompositionBlock.from_dict(head_setup)
        for name in sorted(setup.flatten()):
            self.load_adapter(os.path.join(directory, name), custom_weights_loaders=custom_weights_loaders,
                              use_safetensors=use_safetensors, set_active=False)
        for fusion in _fusions_of(setup):
            self.load_adapter_fusion(os.path.join(directory, fusion.name),
                                     custom_weights_loaders=custom_weights_loaders, use_safetensors=use_safetensors,
                                     set_active=False)
        if head_setup is True:
            self.load_head(directory, use_safetensors=use_safetensors)
        for head in _head_names(head_setup):
            self.load_head(os.path.join(directory, head), head, use_safetensors=use_safetensors, set_active=False)
        if set_active:
            self.set_active_adapters(setup)
            if head_setup and head_setup is not True:
                self.active_head = head_setup
        return setup, head_setup
