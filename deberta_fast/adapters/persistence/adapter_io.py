"""save_adapter / load_adapter / save_head / load_head / save_adapter_fusion / load_adapter_fusion in AdapterHub
1.3.0's format (see persistence/files.py).

Loading is strict where AdapterHub only logs: a weights file whose keys do not match the adapter's modules (missing
keys, unexpected keys, wrong shapes) raises ValueError naming the file and the keys, and the model is left as it
was before the call. Keys of layers dropped with ``leave_out`` are skipped, as intended by that option.

Prefix tuning: AdapterHub's files hold every prefix tensor twice, under the pool (``deberta.prefix_tuning.``) and
under each layer's alias (``deberta.encoder.layer.<i>.attention.self.prefix_tuning.pool.``). Saving writes both
(as separate tensors in safetensors files, which AdapterHub cannot write); loading accepts either and checks that
copies agree. A prefix file whose config says flat=False but whose tensors are the flat form (AdapterHub saves an
ejected prefix that way) loads as flat=True.

``load_adapter`` also takes a Hugging Face Hub id (persistence/hub.py resolves it to a local snapshot).
"""

from __future__ import annotations

import logging
import os
import re

import torch
from packaging.version import InvalidVersion, Version

from ..composition.fusion_management import fusion_name_of
from ..configuration import adapter_config_hash
from ..heads.static import STATIC_HEAD_ARCHITECTURES, static_head_conversion
from . import files
from .hub import resolve_adapter_path

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
# AdapterHub's per-layer alias of the prefix pool, and the pool itself.
_PREFIX_ALIAS = re.compile(r"^(?P<base>.*)encoder\.layer\.\d+\.attention\.self\.prefix_tuning\.pool\.(?P<rest>.*)$")
_POOL_PREFIX = "prefix_tuning."


def _belongs_to_adapter(key: str, name: str) -> bool:
    return any(segment.format(name) in key for segment in _ADAPTER_SEGMENTS)


def _rename_adapter_key(key: str, old: str, new: str) -> str:
    for legacy, current in _LEGACY_RENAMES.items():
        key = key.replace(legacy, current)
    if old != new:
        for segment in ("adapters.{}.", ".prefix_tunings.{}.", ".prefix_gates.{}.", ".loras.{}.",
                        ".shared_parameters.{}.", ".refts.{}.", ".prompt_tunings.{}."):
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
        ``save_directory`` in AdapterHub's format, atomically as a whole directory (atomic_directory in files.py:
        other files in the folder are kept)."""
        if adapter_name not in self.adapters_config:
            raise ValueError(f"No adapter with name '{adapter_name}' found. "
                             f"Added adapters: {list(self.adapters_config)}")
        replaces = files.ADAPTER_FILES + (files.HEAD_FILES if with_head and adapter_name in self.heads else ())
        with files.atomic_directory(save_directory, replaces) as staging:
            self._write_adapter(staging, adapter_name, with_head, meta_dict, custom_weights_loaders, use_safetensors)

    def _write_adapter(self, directory, adapter_name, with_head, meta_dict, custom_weights_loaders,
                       use_safetensors) -> None:
        config = self.adapters_config.get(adapter_name)
        state = self._adapter_state_dict(adapter_name)
        weights_name = files.SAFE_WEIGHTS_NAME if use_safetensors else files.WEIGHTS_NAME
        files.write_weights(os.path.join(directory, weights_name), state, use_safetensors)
        files.write_json(os.path.join(directory, files.CONFIG_NAME),
                         self._file_envelope(config.to_dict(), adapter_name, meta_dict))
        if with_head and adapter_name in self.heads:
            self._write_head(directory, adapter_name, use_safetensors)
        for loader in custom_weights_loaders or []:
            loader.save(directory, adapter_name)

    def _adapter_state_dict(self, adapter_name: str) -> dict:
        """The adapter's tensors under AdapterHub's keys (prefix pool tensors also under each layer's alias)."""
        state = {k: v for k, v in self.state_dict().items() if _belongs_to_adapter(k, adapter_name)}
        pool = f"{self.base_model_prefix}.{_POOL_PREFIX}"
        pool_keys = [k for k in state if k.startswith(pool)]
        if not pool_keys:
            return state
        aliases = {}
        for i, _ in self.iter_layers():
            layer_pool = f"{self.base_model_prefix}.encoder.layer.{i}.attention.self.prefix_tuning.pool."
            for key in pool_keys:
                aliases[layer_pool + key[len(pool):]] = state[key]
        return {**aliases, **state}

    def save_all_adapters(self, save_directory: str, with_head: bool = True, meta_dict: dict = None,
                          custom_weights_loaders=None, use_safetensors: bool = False) -> None:
        """save_adapter for every adapter into ``save_directory/<name>`` (with "config_id" = the config hash), all
        in one atomic directory swap of ``save_directory``."""
        replaces = files.ADAPTER_FILES + (files.HEAD_FILES if with_head else ())
        with files.atomic_directory(save_directory, subfolder_replaces=replaces) as staging:
            for name in self.adapters_config:
                meta = dict(meta_dict or {})
                meta["config_id"] = adapter_config_hash(self.adapters_config.get(name))
                folder = os.path.join(staging, name)
                os.mkdir(folder)
                self._write_adapter(folder, name, with_head, meta, custom_weights_loaders, use_safetensors)

    def load_adapter(self, adapter_name_or_path: str, config=None, version=None, model_name=None, load_as=None,
                     with_head: bool = True, custom_weights_loaders=None, leave_out=None, id2label=None,
                     set_active: bool = False, use_safetensors: bool = False, **kwargs) -> str:
        """Load an adapter saved by ``save_adapter`` (here or in AdapterHub) from a local directory or a Hugging Face
        Hub repository id (``version``: its revision; ``cache_dir`` / ``token`` / ``local_files_only`` go to the
        download); returns the name it was added under (``load_as`` or the saved name). ``leave_out`` drops the
        adapter from those layers; ``use_safetensors`` prefers adapter.safetensors; ``id2label`` overrides the
        head's labels."""
        loading_info = kwargs.pop("loading_info", None)
        num_labels = kwargs.pop("num_labels", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "token", "local_files_only", "force_download")
                      if k in kwargs}
        if kwargs:
            raise TypeError(f"load_adapter got unexpected keyword arguments {sorted(kwargs)}")
        if config is not None or model_name is not None:
            logger.warning("load_adapter: 'config' and 'model_name' selected adapters on the retired AdapterHub Hub; "
                           "deberta_fast loads local directories and Hugging Face Hub repositories and ignores them")
        if num_labels is not None and id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        directory = resolve_adapter_path(adapter_name_or_path, version=version, **hub_kwargs)
        config_path = os.path.join(directory, files.CONFIG_NAME)
        file_config = files.read_json(config_path)
        for key in ("config", "name"):
            if key not in file_config:
                raise ValueError(f"{config_path}: missing the {key!r} entry of an AdapterHub adapter config")
        if not isinstance(file_config["config"], dict) or not isinstance(file_config["name"], str):
            raise ValueError(f"{config_path}: 'config' must be an object and 'name' a string; got config="
                             f"{file_config['config']!r}, name={file_config['name']!r}")
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
        _fix_ejected_prefix(file_config, state, weights_path)

        saved_name = file_config["name"]
        name = load_as or saved_name
        added = name not in self.adapters_config
        # Any error below (weights, head, custom loaders) leaves the model as it was before the call.
        restore = self._snapshot(lambda key: _belongs_to_adapter(key, name))
        if added:
            try:
                self.add_adapter(name, config=file_config["config"])
            except (ValueError, TypeError) as error:
                raise _naming_file(error, config_path) from None
        else:
            logger.warning("Overwriting existing adapter '%s'.", name)
        try:
            left_out = set(file_config["config"].get("leave_out") or [])
            self._copy_adapter_weights(weights_path, state, saved_name, name, left_out)
            if with_head:
                self._load_head_dir(directory, load_as=load_as, id2label=id2label, use_safetensors=use_safetensors,
                                    set_active=set_active, main_load_name=name, required=False)
            for loader in custom_weights_loaders or []:
                loader.load(directory, load_as=load_as, loading_info=loading_info, main_load_name=name,
                            id2label=id2label, set_active=set_active)
            if set_active:
                self.set_active_adapters(name)
        except BaseException:
            if added:
                self.delete_adapter(name)
            restore()
            raise
        if isinstance(loading_info, dict):
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        return name

    def _snapshot(self, selects):
        """A function that restores the heads, the active setup and the values of the tensors whose key
        ``selects`` to their state at this call (the rollback of a failed load)."""
        heads = dict(self.heads.items())
        active_heads = self._active_heads
        active_setup = self.adapters_config.active_setup
        values = {k: v.detach().clone() for k, v in self._named_tensors().items() if selects(k)}

        def restore() -> None:
            for head_name in [n for n in self.heads if n not in heads]:
                del self.heads[head_name]
            for head_name, head in heads.items():
                if head_name not in self.heads or self.heads[head_name] is not head:
                    self.heads[head_name] = head
            self._active_heads = active_heads
            self._refresh_tied_weights_keys()
            current = self._named_tensors()
            with torch.no_grad():
                for key, value in values.items():
                    if key in current and current[key].shape == value.shape:
                        current[key].copy_(value)
            self.adapters_config.active_setup = active_setup

        return restore

    def _copy_adapter_weights(self, path: str, state: dict, saved_name: str, name: str, left_out: set) -> None:
        renamed, aliases = {}, {}
        for key, tensor in state.items():
            key = _rename_adapter_key(key, saved_name, name)
            if not key.startswith(self.base_model_prefix + "."):
                key = f"{self.base_model_prefix}.{key}"
            alias = _PREFIX_ALIAS.match(key)
            if alias is not None:
                pool_key = f"{alias.group('base')}{_POOL_PREFIX}{alias.group('rest')}"
                aliases.setdefault(pool_key, []).append((key, tensor))
                continue
            renamed[key] = tensor
        for pool_key, copies in aliases.items():
            reference = renamed.setdefault(pool_key, copies[0][1])
            differing = [key for key, tensor in copies if tensor.shape != reference.shape
                         or not torch.equal(tensor, reference)]
            if differing:
                raise ValueError(f"{path}: the prefix tensor {pool_key} and its per-layer copies {differing} differ; "
                                 "the file is inconsistent")
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

    # ---- AdapterFusion ----------------------------------------------------------------------------------------

    def save_adapter_fusion(self, save_directory: str, adapter_names, meta_dict: dict = None,
                            custom_weights_loaders=None, with_head=False, use_safetensors: bool = False) -> None:
        """Write an AdapterFusion (adapter_fusion_config.json + pytorch_model_adapter_fusion.bin, or
        model_adapter_fusion.safetensors) to ``save_directory``. ``with_head``: True saves the head named like the
        fusion, a string names the head."""
        name = fusion_name_of(adapter_names)
        config, names = self.adapters_config.get_fusion(name)
        if config is None:
            raise ValueError(f"Unknown AdapterFusion '{name}'. Fusions: {list(self.adapters_config.fusions)}")
        head_name = None
        if with_head:
            head_name = with_head if isinstance(with_head, str) else name
            if head_name not in self.heads:
                raise ValueError(f"No head with name {head_name} found")
        replaces = files.FUSION_FILES + (files.HEAD_FILES if head_name is not None else ())
        with files.atomic_directory(save_directory, replaces) as staging:
            self._write_fusion(staging, name, config, names, meta_dict, custom_weights_loaders, head_name,
                               use_safetensors)

    def _write_fusion(self, directory, name, config, names, meta_dict, custom_weights_loaders, head_name,
                      use_safetensors) -> None:
        marker = f".adapter_fusion_layer.{name}."
        state = {k: v for k, v in self.state_dict().items() if marker in k}
        weights_name = files.SAFE_ADAPTERFUSION_WEIGHTS_NAME if use_safetensors else files.ADAPTERFUSION_WEIGHTS_NAME
        files.write_weights(os.path.join(directory, weights_name), state, use_safetensors)
        envelope = self._file_envelope(config.to_dict(), name, meta_dict)
        envelope["adapter_names"] = list(names)
        files.write_json(os.path.join(directory, files.ADAPTERFUSION_CONFIG_NAME), envelope)
        for loader in custom_weights_loaders or []:
            loader.save(directory, name)
        if head_name is not None:
            self._write_head(directory, head_name, use_safetensors)

    def save_all_adapter_fusions(self, save_directory: str, meta_dict: dict = None, custom_weights_loaders=None,
                                 use_safetensors: bool = False) -> None:
        """save_adapter_fusion for every fusion into ``save_directory/<fusion name>`` (with "config_id"), all in
        one atomic directory swap of ``save_directory``."""
        with files.atomic_directory(save_directory, subfolder_replaces=files.FUSION_FILES) as staging:
            for name in self.adapters_config.fusions:
                config, names = self.adapters_config.get_fusion(name)
                meta = dict(meta_dict or {})
                meta["config_id"] = adapter_config_hash(config)
                folder = os.path.join(staging, name)
                os.mkdir(folder)
                self._write_fusion(folder, name, config, names, meta, custom_weights_loaders, None, use_safetensors)

    def load_adapter_fusion(self, adapter_fusion_name_or_path: str, load_as: str = None, custom_weights_loaders=None,
                            set_active: bool = False, with_head: bool = True, use_safetensors: bool = False,
                            **kwargs) -> str:
        """Load an AdapterFusion saved by ``save_adapter_fusion`` (here or in AdapterHub); its adapters must be
        loaded already. Returns the fusion name (``load_as`` or the saved one)."""
        loading_info = kwargs.pop("loading_info", None)
        if kwargs:
            raise TypeError(f"load_adapter_fusion got unexpected keyword arguments {sorted(kwargs)}")
        directory = adapter_fusion_name_or_path
        weights_path = files.weights_file(directory, files.ADAPTERFUSION_WEIGHTS_NAME,
                                          files.SAFE_ADAPTERFUSION_WEIGHTS_NAME, use_safetensors)
        if not os.path.isdir(directory) or weights_path is None:
            raise ValueError(f"{directory}: Loading path should be a directory where AdapterFusion is saved "
                             f"({files.ADAPTERFUSION_CONFIG_NAME} + {files.ADAPTERFUSION_WEIGHTS_NAME} or "
                             f"{files.SAFE_ADAPTERFUSION_WEIGHTS_NAME}).")
        config_path = os.path.join(directory, files.ADAPTERFUSION_CONFIG_NAME)
        file_config = files.read_json(config_path)
        for key in ("config", "name"):
            if key not in file_config:
                raise ValueError(f"{config_path}: missing the {key!r} entry of an AdapterFusion config")
        if not isinstance(file_config["config"], (dict, str)) or not isinstance(file_config["name"], str):
            raise ValueError(f"{config_path}: 'config' must be an object or a name and 'name' a string; got "
                             f"config={file_config['config']!r}, name={file_config['name']!r}")
        saved_name = file_config["name"]
        name = load_as or saved_name
        adapter_names = file_config.get("adapter_names", name)
        state = files.read_weights(weights_path)
        added = name not in self.adapters_config.fusions
        restore = self._snapshot(lambda key: f".adapter_fusion_layer.{name}." in key)
        if added:
            self.add_adapter_fusion(adapter_names, file_config["config"], name=name, overwrite_ok=True,
                                    set_active=set_active)
        else:
            logger.warning("Overwriting existing adapter fusion module '%s'", name)
        try:
            renamed = {k.replace(f".adapter_fusion_layer.{saved_name}.", f".adapter_fusion_layer.{name}."): v
                       for k, v in state.items()}
            marker = f".adapter_fusion_layer.{name}."
            expected = {k: v for k, v in self._named_tensors().items() if marker in k}
            unexpected = [k for k in renamed if k not in expected]
            missing = sorted(k for k in expected if k not in renamed)
            _raise_on_mismatch(weights_path, missing, unexpected, renamed, expected)
            with torch.no_grad():
                for key, target in expected.items():
                    target.copy_(renamed[key])
            if with_head:
                self._load_head_dir(directory, load_as=load_as, id2label=None, use_safetensors=use_safetensors,
                                    set_active=set_active, main_load_name=name, required=False)
            for loader in custom_weights_loaders or []:
                loader.load(directory, load_as=load_as, loading_info=loading_info, main_load_name=name,
                            set_active=set_active)
            if set_active:
                self.set_active_adapters(self._fuse_block(name))
        except BaseException:
            if added:
                self.delete_adapter_fusion(name)
            restore()
            raise
        if isinstance(loading_info, dict):
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        return name

    def _fuse_block(self, fusion_name: str):
        from ..composition.blocks import Fuse

        _, names = self.adapters_config.get_fusion(fusion_name)
        return Fuse(*names, name=fusion_name)

    # ---- heads ------------------------------------------------------------------------------------------------

    def save_head(self, save_directory: str, head_name: str = None, use_safetensors: bool = False) -> None:
        """Write head ``head_name`` (head_config.json + weights) to ``save_directory``, atomically as a whole
        directory."""
        if head_name is None:
            if len(self.heads) != 1:
                raise ValueError(f"save_head: pass head_name (the model has heads {list(self.heads)})")
            head_name = next(iter(self.heads))
        if head_name not in self.heads:
            raise ValueError(f"Unknown head_name '{head_name}'. Heads: {list(self.heads)}")
        with files.atomic_directory(save_directory, files.HEAD_FILES) as staging:
            self._write_head(staging, head_name, use_safetensors)

    def _write_head(self, directory: str, head_name: str, use_safetensors: bool) -> None:
        prefix = f"heads.{head_name}."
        state = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        weights_name = files.SAFE_HEAD_WEIGHTS_NAME if use_safetensors else files.HEAD_WEIGHTS_NAME
        files.write_weights(os.path.join(directory, weights_name), state, use_safetensors)
        files.write_json(os.path.join(directory, files.HEAD_CONFIG_NAME),
                         self._file_envelope(dict(self.heads[head_name].config), head_name))

    def save_all_heads(self, save_directory: str, use_safetensors: bool = False) -> None:
        """save_head for every head into ``save_directory/<name>``, in one atomic directory swap; other files in
        those folders (an adapter saved there by save_all_adapters) are kept."""
        with files.atomic_directory(save_directory, subfolder_replaces=files.HEAD_FILES) as staging:
            for name in self.heads:
                folder = os.path.join(staging, name)
                os.mkdir(folder)
                self._write_head(folder, name, use_safetensors)

    def load_head(self, save_directory: str, load_as: str = None, id2label=None, use_safetensors: bool = False,
                  **kwargs) -> str:
        """Load a head saved by ``save_head`` (or with an adapter); returns its name. The head becomes active
        unless ``set_active=False`` is passed. A ``loading_info`` dict gets "missing_keys" / "unexpected_keys"
        lists (AdapterHub's); they stay empty, as a mismatch raises ValueError here."""
        set_active = kwargs.pop("set_active", True)
        loading_info = kwargs.pop("loading_info", None)
        if kwargs:
            raise TypeError(f"load_head got unexpected keyword arguments {sorted(kwargs)}")
        name = self._load_head_dir(save_directory, load_as=load_as, id2label=id2label,
                                   use_safetensors=use_safetensors, set_active=set_active, main_load_name=None,
                                   required=True)
        if isinstance(loading_info, dict):
            loading_info.setdefault("missing_keys", [])
            loading_info.setdefault("unexpected_keys", [])
        return name

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


def _naming_file(error: Exception, path: str) -> Exception:
    """``error`` with ``path`` in front of its message, same type where the type allows it."""
    try:
        return type(error)(f"{path}: {error}")
    except Exception:
        return ValueError(f"{path}: {error}")


def _fix_ejected_prefix(file_config: dict, state: dict, path: str) -> None:
    """A prefix-tuning file saved by AdapterHub after eject_prefix_tuning holds the flat tensors while its config
    still says flat=False; load it as flat=True (with a warning)."""
    config = file_config.get("config")
    members = config.get("configs", []) if isinstance(config, dict) and config.get("architecture") == "union" \
        else [config]
    for member in members:
        if not isinstance(member, dict) or member.get("architecture") != "prefix_tuning" or member.get("flat"):
            continue
        keys = [k for k in state if ".prefix_tunings." in k]
        if keys and all(k.endswith(".control_trans") for k in keys):
            logger.warning("%s: the prefix tensors are the flat (ejected) form but the config says flat=False "
                           "(AdapterHub saves ejected prefixes that way); loading with flat=True", path)
            member["flat"] = True
