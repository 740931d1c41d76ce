"""AdapterHub 1.3.0's on-disk format: file names, JSON envelopes, weight files, with atomic writes and strict reads.

Directory written by ``save_adapter(dir, name, with_head=True)``:

    adapter_config.json   {"config": {...}, "hidden_size", "model_class", "model_name", "model_type", "name",
                           "version"} (+ meta keys such as "config_id"), indent 2, keys sorted
    pytorch_adapter.bin   torch.save of {full state-dict key: tensor}   (adapter.safetensors with use_safetensors)
    head_config.json      same envelope around the head config           (only when a head of that name exists)
    pytorch_model_head.bin                                               (model_head.safetensors)

Every file is written to a temporary file in the target directory and moved into place with ``os.replace``, so an
interrupted save leaves the previous file intact. Reading uses ``torch.load(weights_only=True)`` or safetensors;
a file that cannot be read raises ``OSError`` naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "HEAD_CONFIG_NAME",
    "HEAD_WEIGHTS_NAME",
    "SAFE_HEAD_WEIGHTS_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "atomic_path",
    "read_json",
    "read_weights",
    "write_json",
    "write_weights",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "pytorch_model_head.bin"
SAFE_HEAD_WEIGHTS_NAME = "model_head.safetensors"
ADAPTERFUSION_CONFIG_NAME = "adapter_fusion_config.json"
ADAPTERFUSION_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
SAFE_ADAPTERFUSION_WEIGHTS_NAME = "model_adapter_fusion.safetensors"

# The "version" field names the file format: AdapterHub 1.3.0's. AdapterHub reads it to decide on backward-compat
# fixes (LoRA alpha before 1.1, activation names without a version), so we write the version whose format we emit.
FORMAT_VERSION = "adapters.1.3.0"


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in ``path``'s directory to write to; on success the file is synced and replaces
    ``path`` (os.replace), on error it is removed and ``path`` is left untouched. The temporary file has
    ``path``'s base name (inside a temporary folder): torch.save records it in the archive, so the bytes written
    do not depend on the temporary name (and match AdapterHub's files)."""
    directory = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    tmp = os.path.join(staging, os.path.basename(path))
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(staging)


def write_json(path: str, data: dict) -> None:
    """JSON exactly as AdapterHub writes it: indent 2, sorted keys, no trailing newline."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise OSError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OSError(f"{path}: not a valid JSON file ({error})") from None


def _distinct_storage(state_dict: dict) -> dict:
    """safetensors refuses tensors sharing memory (e.g. ``adapter_norm_before`` aliased in ``adapter_down``);
    give each key its own copy."""
    seen, result = set(), {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        elif pointer is not None:
            seen.add(pointer)
        result[key] = tensor.contiguous()
    return result


def write_weights(path: str, state_dict: dict, use_safetensors: bool) -> None:
    """Write ``state_dict`` (CPU copies) atomically as safetensors or a torch pickle."""
    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if use_safetensors:
            save_file(_distinct_storage(tensors), tmp)
        else:
            torch.save(tensors, tmp)


def read_weights(path: str) -> dict:
    """{key: tensor} from a ``.safetensors`` or ``.bin`` file; OSError naming the file if it is missing or broken."""
    if not os.path.isfile(path):
        raise OSError(f"{path}: file not found")
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for truncated/corrupt files
        raise OSError(f"{path}: cannot read the weights ({type(error).__name__}: {error}); the file may be truncated "
                      "or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OSError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def weights_file(directory: str, bin_name: str, safe_name: str, use_safetensors: bool) -> str | None:
    """The weights file to read: the preferred format if present, else the other one, else None."""
    order = (safe_name, bin_name) if use_safetensors else (bin_name, safe_name)
    for name in order:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None
