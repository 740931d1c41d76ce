"""save_adapter / load_adapter / save_head / load_head in AdapterHub 1.3.0's format (see persistence.py).

Loading is strict where AdapterHub only logs: a weights file whose keys do not match the adapter's modules (missing
keys, unexpected keys, wrong shapes) raises ValueError naming the file and the keys, and the model is left as it
was before the call. Keys of layers dropped with ``leave_out`` are skipped, as intended by that option.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from packaging.version import InvalidVersion, Version

from . import persistence as files
from .configuration import adapter_config_hash
from .static_heads import STATIC_HEAD_ARCHITECTURES, static_head_conversion

logger = logging.getLogger("deberta_fast")

__all__ = ["AdapterIOMixin"]

# Key segments that mark a tensor as belonging to adapter <n> (AdapterHub's loader filter).
_ADAPTER_SEGMENTS = ("_adapters.{}.", ".adapters.{}.", ".prefix_tunings.{}.", ".prefix_gates.{}.", ".loras.{}.",
                     ".refts.{}.", ".prompt_tunings.{}.", ".shared_parameters.{}.")
# Module names of adapter-transformers 1.x / 2.x files.
_LEGACY_RENAMES = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
                   "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
                   "invertible_lang_adapters": "invertible_adapters"}
# Activation names of files written before AdapterHub versioned its files.
_ACTIVATION_RENAMES = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")


def _belongs_to_adapter(key: str, name: str) -> bool:
    return any(segment.format(name) in key for segment in _ADAPTER_SEGMENTS)


def _rename_adapter_key(key: str, old: str, new: str) -> str:
    for legacy, current in _LEGACY_RENAMES.items():
        key = key.replace(legacy, current)
    if old != new:
        for segment in ("adapters.{}.", ".prefix_tunings.{}.", ".prefix_gates.{}.", ".loras.{}.",
                        ".shared_parameters.{}.", ".refts.{}."):
            key = key.replace(segment.format(old), segment.format(new))
    return key


def fix_backward_compat(file_config: dict) -> None:
    """AdapterHub < 1.1 ignored LoRA's alpha (scaling 1); such files load with alpha = r, as in AdapterHub."""
    version = str(file_config.get("version", ""))
    if not version.startswith("adapters."):
        return
    try:
        old = Version(version[len("adapters."):]) < Version("1.1.0")
    except InvalidVersion:
        return
    config = file_config.get("config") or {}
    if old and config.get("architecture") == "lora" and config.get("r") != config.get("alpha"):
        logger.warning("Loading a LoRA saved by AdapterHub %s, whose scaling ignored alpha: setting alpha = r = %s so "
                       "the adapter works as trained (AdapterHub PR #770).", version, config.get("r"))
        config["alpha"] = config["r"]


class AdapterIOMixin:
    """Saving and loading adapters and heads (AdapterHub's API and file format)."""

    def _file_envelope(self, config, name, meta_dict=None) -> dict:
        envelope = {
            "config": config,
            "hidden_size": self.config.hidden_size,
            "model_class": type(self).__name__,
            "model_name": self.config.name_or_path or "",
            "model_type": self.config.model_type,
            "name": name,
            "version": files.FORMAT_VERSION,
        }
        for key, value in (meta_dict or {}).items():
            envelope.setdefault(key, value)
        return envelope

    def _named_tensors(self) -> dict:
        tensors = dict(self.named_parameters(remove_duplicate=False))
        tensors.update(dict(self.named_buffers(remove_duplicate=False)))
        return tensors

    # ---- adapters ---------------------------------------------------------------------------------------------

    def save_adapter(self, save_directory: str, adapter_name: str, with_head: bool = True, meta_dict: dict = None,
                     custom_weights_loaders=None, use_safetensors: bool = False) -> None:
        """Write adapter ``adapter_name`` (and, with_head, the head of the same name if there is one) to
        ``save_directory`` in AdapterHub's format; every file is replaced atomically."""
        if adapter_name not in self.adapters_config:
            raise ValueError(f"No adapter with name '{adapter_name}' found. "
                             f"Added adapters: {list(self.adapters_config)}")
        _make_directory(save_directory)
        config = self.adapters_config.get(adapter_name)
        state = {k: v for k, v in self.state_dict().items() if _belongs_to_adapter(k, adapter_name)}
        weights_name = files.SAFE_WEIGHTS_NAME if use_safetensors else files.WEIGHTS_NAME
        files.write_weights(os.path.join(save_directory, weights_name), state, use_safetensors)
        files.write_json(os.path.join(save_directory, files.CONFIG_NAME),
                         self._file_envelope(config.to_dict(), adapter_name, meta_dict))
        if with_head and adapter_name in self.heads:
            self.save_head(save_directory, adapter_name, use_safetensors=use_safetensors)
        for loader in custom_weights_loaders or []:
            loader.save(save_directory, adapter_name)

    def save_all_adapters(self, save_directory: str, with_head: bool = True, meta_dict: dict = None,
                          custom_weights_loaders=None, use_safetensors: bool = False) -> None:
        """save_adapter for every adapter into ``save_directory/<name>`` (with "config_id" = the config hash)."""
        _make_directory(save_directory)
        for name in self.adapters_config:
            meta = dict(meta_dict or {})
            meta["config_id"] = adapter_config_hash(self.adapters_config.get(name))
            self.save_adapter(os.path.join(save_directory, name), name, with_head=with_head, meta_dict=meta,
                              custom_weights_loaders=custom_weights_loaders, use_safetensors=use_safetensors)

    def load_adapter(self, adapter_name_or_path: str, config=None, version=None, model_name=None, load_as=None,
                     with_head: bool = True, custom_weights_loaders=None, leave_out=None, id2label=None,
                     set_active: bool = False, use_safetensors: bool = False, **kwargs) -> str:
        """Load an adapter saved by ``save_adapter`` (here or in AdapterHub) from a local directory; returns the
        name it was added under (``load_as`` or the saved name). ``leave_out`` drops the adapter from those
        layers; ``use_safetensors`` prefers adapter.safetensors; ``id2label`` overrides the head's labels."""
        loading_info = kwargs.pop("loading_info", None)
        num_labels = kwargs.pop("num_labels", None)
        if kwargs:
            raise TypeError(f"load_adapter got unexpected keyword arguments {sorted(kwargs)}")
        if config is not None or model_name is not None or version is not None:
            logger.warning("load_adapter: 'config', 'model_name' and 'version' select adapters on the AdapterHub Hub; "
                           "deberta_fast loads from local directories and ignores them")
        if num_labels is not None and id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        directory = adapter_name_or_path
        if not os.path.isdir(directory):
            raise OSError(f"{directory}: not a directory; deberta_fast loads adapters saved with save_adapter from a "
                          "local directory (no AdapterHub / Hugging Face Hub download)")
        config_path = os.path.join(directory, files.CONFIG_NAME)
        file_config = files.read_json(config_path)
        for key in ("config", "name"):
            if key not in file_config:
                raise ValueError(f"{config_path}: missing the {key!r} entry of an AdapterHub adapter config")
        if "version" not in file_config and isinstance(file_config["config"], dict):
            activation = file_config["config"].get("non_linearity")
            if activation in _ACTIVATION_RENAMES:
                file_config["config"]["non_linearity"] = _ACTIVATION_RENAMES[activation]
        if leave_out is not None:
            previous = file_config["config"].get("leave_out") or []
            file_config["config"]["leave_out"] = sorted(set(leave_out) | set(previous))
        fix_backward_compat(file_config)

        weights_path = files.weights_file(directory, files.WEIGHTS_NAME, files.SAFE_WEIGHTS_NAME, use_safetensors)
        if weights_path is None:
            raise OSError(f"{directory}: no {files.WEIGHTS_NAME} or {files.SAFE_WEIGHTS_NAME} found")
        state = files.read_weights(weights_path)

        saved_name = file_config["name"]
        name = load_as or saved_name
        added = name not in self.adapters_config
        if added:
            self.add_adapter(name, config=file_config["config"])
        else:
            logger.warning("Overwriting existing adapter '%s'.", name)
        try:
            left_out = set(file_config["config"].get("leave_out") or [])
            self._copy_adapter_weights(weights_path, state, saved_name, name, left_out)
        except Exception:
            if added:
                self.delete_adapter(name)
            raise
        if isinstance(loading_info, dict):
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        if with_head:
            self._load_head_dir(directory, load_as=load_as, id2label=id2label, use_safetensors=use_safetensors,
                                set_active=set_active, main_load_name=name, required=False)
        for loader in custom_weights_loaders or []:
            loader.load(directory, load_as=load_as, loading_info=loading_info, main_load_name=name, id2label=id2label,
                        set_active=set_active)
        if set_active:
            self.set_active_adapters(name)
        return name

    def _copy_adapter_weights(self, path: str, state: dict, saved_name: str, name: str, left_out: set) -> None:
        renamed = {}
        for key, tensor in state.items():
            key = _rename_adapter_key(key, saved_name, name)
            if not key.startswith(self.base_model_prefix + "."):
                key = f"{self.base_model_prefix}.{key}"
            renamed[key] = tensor
        expected = {k: v for k, v in self._named_tensors().items() if _belongs_to_adapter(k, name)}
        unexpected, skipped = [], []
        for key in renamed:
            if key in expected:
                continue
            layer = _LAYER_INDEX.search(key)
            if _belongs_to_adapter(key, name) and layer and int(layer.group(1)) in left_out:
                skipped.append(key)
            else:
                unexpected.append(key)
        missing = sorted(k for k in expected if k not in renamed)
        _raise_on_mismatch(path, missing, unexpected, renamed, expected)
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(renamed[key])
        if skipped:
            logger.info("%s: skipped %d tensors of left-out layers", path, len(skipped))

    # ---- heads ------------------------------------------------------------------------------------------------

    def save_head(self, save_directory: str, head_name: str = None, use_safetensors: bool = False) -> None:
        """Write head ``head_name`` (head_config.json + weights) to ``save_directory``."""
        if head_name is None:
            if len(self.heads) != 1:
                raise ValueError(f"save_head: pass head_name (the model has heads {list(self.heads)})")
            head_name = next(iter(self.heads))
        if head_name not in self.heads:
            raise ValueError(f"Unknown head_name '{head_name}'. Heads: {list(self.heads)}")
        _make_directory(save_directory)
        prefix = f"heads.{head_name}."
        state = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        weights_name = files.SAFE_HEAD_WEIGHTS_NAME if use_safetensors else files.HEAD_WEIGHTS_NAME
        files.write_weights(os.path.join(save_directory, weights_name), state, use_safetensors)
        files.write_json(os.path.join(save_directory, files.HEAD_CONFIG_NAME),
                         self._file_envelope(dict(self.heads[head_name].config), head_name))

    def save_all_heads(self, save_directory: str, use_safetensors: bool = False) -> None:
        _make_directory(save_directory)
        for name in self.heads:
            self.save_head(os.path.join(save_directory, name), name, use_safetensors=use_safetensors)

    def load_head(self, save_directory: str, load_as: str = None, id2label=None, use_safetensors: bool = False,
                  **kwargs) -> str:
        """Load a head saved by ``save_head`` (or with an adapter); returns its name. The head becomes active
        unless ``set_active=False`` is passed."""
        set_active = kwargs.pop("set_active", True)
        if kwargs:
            raise TypeError(f"load_head got unexpected keyword arguments {sorted(kwargs)}")
        return self._load_head_dir(save_directory, load_as=load_as, id2label=id2label,
                                   use_safetensors=use_safetensors, set_active=set_active, main_load_name=None,
                                   required=True)

    def _load_head_dir(self, directory, load_as, id2label, use_safetensors, set_active, main_load_name, required):
        weights_path = files.weights_file(directory, files.HEAD_WEIGHTS_NAME, files.SAFE_HEAD_WEIGHTS_NAME,
                                          use_safetensors)
        if weights_path is None:
            if required:
                raise OSError(f"{directory}: no {files.HEAD_WEIGHTS_NAME} or {files.SAFE_HEAD_WEIGHTS_NAME} found")
            return None
        config_path = os.path.join(directory, files.HEAD_CONFIG_NAME)
        file_config = files.read_json(config_path)
        model_class = file_config.get("model_class")
        renames = {}
        if model_class in (type(self).__name__, "DebertaV2AdapterModel", "DebertaV2ModelWithHeads"):
            saved_name = file_config["name"]
            head_name = load_as or saved_name
            head_config = dict(file_config["config"])
            if saved_name != head_name:
                renames[rf"^heads\.{re.escape(saved_name)}\."] = f"heads.{head_name}."
        elif model_class in STATIC_HEAD_ARCHITECTURES:
            head_name = main_load_name or load_as
            if head_name is None:
                raise ValueError(f"{config_path}: a {model_class} head needs a name; pass load_as")
            label2id = file_config.get("label2id")
            if file_config.get("num_labels") and not label2id:
                label2id = {f"LABEL_{i}": i for i in range(file_config["num_labels"])}
            head_config, renames = static_head_conversion(self.config, head_name, architecture=model_class,
                                                          label2id=label2id)
        else:
            raise ValueError(f"{config_path}: cannot convert a prediction head of model class {model_class!r} to a "
                             "flexible head")
        if id2label:
            head_config["label2id"] = {label: int(i) for i, label in id2label.items()}
        state = files.read_weights(weights_path)
        renamed = {}
        for key, tensor in state.items():
            for pattern, replacement in renames.items():
                key, count = re.subn(pattern, replacement, key)
                if count:
                    break
            renamed[key] = tensor
        previous = self.heads[head_name] if head_name in self.heads else None
        previous_active = self._active_heads
        if previous is not None:
            logger.warning("Overwriting existing head '%s'", head_name)
        self.add_prediction_head_from_config(head_name, head_config, overwrite_ok=True, set_active=set_active)
        try:
            prefix = f"heads.{head_name}."
            expected = {k: v for k, v in self._named_tensors().items() if k.startswith(prefix)}
            unexpected = [k for k in renamed if k not in expected]
            missing = sorted(k for k in expected if k not in renamed and not self._is_tied_head_key(k))
            _raise_on_mismatch(weights_path, missing, unexpected, renamed, expected)
            with torch.no_grad():
                for key, target in expected.items():
                    if key not in renamed:
                        continue
                    if self._is_tied_head_key(key):
                        # AdapterHub saves a copy of the tied word embeddings with a masked-LM head; the model
                        # keeps its own embeddings (loading a head must not change the base model).
                        if not torch.equal(renamed[key].to(target.dtype), target.detach().cpu().to(target.dtype)):
                            logger.warning("%s: %s differs from the model's word embeddings, to which it is tied; "
                                           "the model's word embeddings are kept", weights_path, key)
                        continue
                    target.copy_(renamed[key])
        except Exception:
            del self.heads[head_name]
            if previous is not None:
                self.heads[head_name] = previous
            self._active_heads = previous_active
            self._refresh_tied_weights_keys()
            raise
        return head_name

    def _is_tied_head_key(self, key: str) -> bool:
        return key in self._head_tied_weights_keys()


def _raise_on_mismatch(path, missing, unexpected, loaded, expected) -> None:
    shapes = [f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in loaded if k in expected and tuple(loaded[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {sorted(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise ValueError(f"{path}: the weights do not match the model's modules: " + "; ".join(problems))


def _make_directory(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory")
    os.makedirs(path, exist_ok=True)
