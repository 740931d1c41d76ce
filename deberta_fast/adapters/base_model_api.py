"""The adapter API on ``model.base_model`` (the DeBERTa encoder inside an adapter model), as AdapterHub's base
model carries it: ``model.base_model.add_adapter(...)``, ``.load_adapter``, ``.supports_adapter``,
``.get_fusion_regularization_loss()``, ``.loaded_embeddings``, ...

The base model holds a weak reference to the model that owns it (set by that model; a strong one would make a
module cycle) and forwards these calls to it: one registry of adapters, one set of modules, whichever object is
called. As AdapterHub's base model knows no heads, ``save_adapter`` / ``load_adapter`` / ``save_all_adapters``
called on it leave heads out.
"""

from __future__ import annotations

import weakref

__all__ = ["BASE_MODEL_API", "AdapterOwnerMixin", "BaseModelAdapterAPI", "set_adapter_owner"]

# AdapterHub ModelAdaptersMixin names forwarded as they are.
BASE_MODEL_API = (
    "add_adapter", "delete_adapter", "get_adapter", "has_adapters", "supports_adapter", "set_active_adapters",
    "train_adapter", "train_adapter_fusion", "freeze_model", "add_adapter_fusion", "delete_adapter_fusion",
    "get_fusion_regularization_loss", "merge_adapter", "reset_adapter", "average_adapter", "eject_prefix_tuning",
    "save_adapter_fusion", "load_adapter_fusion", "save_all_adapter_fusions", "adapter_summary", "adapter_to",
    "adapter_fusion_to", "apply_to_adapter_layers", "apply_to_basemodel_childs", "iter_layers",
    "add_embeddings", "load_embeddings", "save_embeddings", "set_active_embeddings", "delete_embeddings",
    "save_adapter_setup", "load_adapter_setup", "push_adapter_to_hub",
)
# Read-only attributes forwarded.
_BASE_MODEL_ATTRIBUTES = ("loaded_embeddings", "active_embeddings", "has_parallel_adapters")


def set_adapter_owner(base_model, owner) -> None:
    """Record ``owner`` (the adapter model) as the model whose adapter API ``base_model`` forwards to."""
    base_model.__dict__["_adapter_owner"] = weakref.ref(owner)


def _forward(name: str):
    def method(self, *args, **kwargs):
        return getattr(self._adapter_owner_model(), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The owning adapter model's ``{name}`` (see base_model_api.py)."
    return method


def _attribute(name: str):
    return property(lambda self: getattr(self._adapter_owner_model(), name),
                    doc=f"The owning adapter model's ``{name}``.")


class BaseModelAdapterAPI:
    """Mixin of the adapter-holding base model (module docstring)."""

    # AdapterHub disables the SVD merge of LoRA deltas for DeBERTa(-v2) (its LoRA on DeBERTa v1 is merged QKV).
    support_lora_delta_w_svd = False

    def __getstate__(self):
        # a weak reference cannot be pickled, and a deep copy would point at the original owner: the owner's
        # __setstate__ (AdapterOwnerMixin) records itself again
        state = dict(self.__dict__)
        state.pop("_adapter_owner", None)
        return state

    def get_invertible_adapter(self):
        """The invertible adapter block of the active setup's first adapter, or None."""
        invertible = self._modules.get("invertible_adapters")
        return invertible.first_active() if invertible is not None else None

    def _adapter_owner_model(self):
        ref = self.__dict__.get("_adapter_owner")
        owner = ref() if ref is not None else None
        if owner is None:
            raise AttributeError("this base model is not part of an adapter model (use DebertaV2AdapterModel, or "
                                 "deberta_fast.adapters.init(model))")
        return owner

    @property
    def adapters_config(self):
        return self.__dict__["_adapter_registry"]

    @adapters_config.setter
    def adapters_config(self, registry):
        self.__dict__["_adapter_registry"] = registry

    @property
    def active_adapters(self):
        return self._adapter_owner_model().active_adapters

    @active_adapters.setter
    def active_adapters(self, setup):
        self._adapter_owner_model().set_active_adapters(setup)

    def save_adapter(self, save_directory: str, adapter_name: str, meta_dict: dict = None,
                     custom_weights_loaders=None, use_safetensors: bool = False):
        """save_adapter without a head (AdapterHub's base model has none)."""
        return self._adapter_owner_model().save_adapter(save_directory, adapter_name, with_head=False,
                                                        meta_dict=meta_dict,
                                                        custom_weights_loaders=custom_weights_loaders,
                                                        use_safetensors=use_safetensors)

    def save_all_adapters(self, save_directory: str, meta_dict: dict = None, custom_weights_loaders=None,
                          use_safetensors: bool = False):
        return self._adapter_owner_model().save_all_adapters(save_directory, with_head=False, meta_dict=meta_dict,
                                                             custom_weights_loaders=custom_weights_loaders,
                                                             use_safetensors=use_safetensors)

    def load_adapter(self, adapter_name_or_path: str, *args, **kwargs):
        """load_adapter without a head (AdapterHub's base model has none)."""
        kwargs["with_head"] = False
        return self._adapter_owner_model().load_adapter(adapter_name_or_path, *args, **kwargs)


class AdapterOwnerMixin:
    """Mixin of the model that owns an adapter base model: restores the base model's back-reference after
    unpickling or deep-copying."""

    def __setstate__(self, state):
        super().__setstate__(state)
        base = self.__dict__.get("_modules", {}).get(getattr(self, "base_model_prefix", ""))
        if isinstance(base, BaseModelAdapterAPI):
            set_adapter_owner(base, self)


for _name in BASE_MODEL_API:
    setattr(BaseModelAdapterAPI, _name, _forward(_name))
for _name in _BASE_MODEL_ATTRIBUTES:
    setattr(BaseModelAdapterAPI, _name, _attribute(_name))
del _name
