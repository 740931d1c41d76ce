"""AdapterHub 1.3.0's on-disk format: file names, JSON envelopes, weight files, with atomic writes and strict reads.

Directory written by ``save_adapter(dir, name, with_head=True)``:

    adapter_config.json   {"config": {...}, "hidden_size", "model_class", "model_name", "model_type", "name",
                           "version"} (+ meta keys such as "config_id"), indent 2, keys sorted
    pytorch_adapter.bin   torch.save of {full state-dict key: tensor}   (adapter.safetensors with use_safetensors)
    head_config.json      same envelope around the head config           (only when a head of that name exists)
    pytorch_model_head.bin                                               (model_head.safetensors)

Every save is atomic as a whole directory (``atomic_directory``): the new content is written into a staging folder
next to the target, and the staging folder and the target are swapped in one step (Linux ``renameat2`` with
RENAME_EXCHANGE; elsewhere two renames, whose only gap a later save repairs). A crash at any moment (kill -9, power)
leaves the target holding either all of the old content or all of the new. Files in the target that the save does
not write (a README, tokenizer files, another head) are carried over into the new content, as AdapterHub, which
writes into the folder, leaves them. A save replaces the files of the kinds it writes in both formats (saving
adapter.safetensors removes an older pytorch_adapter.bin), so a folder never offers a stale alternative. Staging
folders of killed saves are swept on the next save into the same parent folder.

Reading uses ``torch.load(weights_only=True)`` or safetensors; a file that cannot be read raises ``OSError`` naming
it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
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
    "atomic_directory",
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

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME)
HEAD_FILES = (HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, SAFE_HEAD_WEIGHTS_NAME)
FUSION_FILES = (ADAPTERFUSION_CONFIG_NAME, ADAPTERFUSION_WEIGHTS_NAME, SAFE_ADAPTERFUSION_WEIGHTS_NAME)

# Staging ("new") and swapped-out ("old") folders of atomic_directory, next to the target.
_SAVE_LEFTOVER = re.compile(r"^\.(?P<base>.+)\.deberta_fast-(?P<kind>new|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# Leftovers of earlier versions' per-file saves inside a target: atomic_path folders and save_pretrained staging.
_LEGACY_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.deberta_fast_save\.[a-z0-9_]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_saves(parent: str) -> None:
    """Remove the staging folders that killed saves left in ``parent``; a swapped-out folder whose target is
    missing (a crash between the two renames of the non-Linux swap) is renamed back into place."""
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return
    for entry in entries:
        match = _SAVE_LEFTOVER.match(entry)
        if not match or _pid_alive(int(match["pid"])):
            continue
        path = os.path.join(parent, entry)
        target = os.path.join(parent, match["base"])
        if match["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(path, target)
                continue
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # no hard links on this file system
        shutil.copy2(source, destination)


def _fsync_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_directory(folder)


def _fsync_directory(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system without exchange support
    raise OSError(code, os.strerror(code), second)


def _carry_over(source: str, destination: str) -> None:
    """Bring an entry of the old folder into the staging folder: folders copied (files hard-linked where possible),
    symlinks re-created as links, files hard-linked or copied."""
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
    elif os.path.islink(source):
        os.symlink(os.readlink(source), destination)
    else:
        _link_or_copy(source, destination)


def _keep_unwritten(old_folder: str, new_folder: str, replaced_names) -> None:
    """Copy (hard-link where possible) the files of ``old_folder`` that ``new_folder`` lacks and that
    ``replaced_names`` does not name."""
    if not (os.path.isdir(old_folder) and not os.path.islink(old_folder) and os.path.isdir(new_folder)):
        return
    written = set(os.listdir(new_folder))
    for entry in os.listdir(old_folder):
        if entry in written or entry in replaced_names or _SAVE_LEFTOVER.match(entry) or _LEGACY_LEFTOVER.match(entry):
            continue
        _carry_over(os.path.join(old_folder, entry), os.path.join(new_folder, entry))


@contextlib.contextmanager
def atomic_directory(target: str, replaces=(), subfolder_replaces=None):
    """Yield an empty staging folder; when the block completes, the target folder becomes the staging content
    plus the entries of the old target that the block did not write and that ``replaces`` does not name (a tuple
    of names, or a predicate on a name), in one atomic step. On error the target is untouched.

    With ``subfolder_replaces`` (a tuple of file names), a subfolder the block wrote that the old target also has
    keeps the old subfolder's files that the block did not write and that the tuple does not name: ``save_all_heads``
    into the folders of ``save_all_adapters`` adds the head files next to the adapter files, as AdapterHub does."""
    target = os.path.realpath(os.fspath(target))  # a symlinked target: save into the folder it points to
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"{target}: exists and is not a directory")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    sweep_saves(parent)
    replaced = replaces if callable(replaces) else (lambda name, names=frozenset(replaces): name in names)
    staging = os.path.join(parent, f".{base}.deberta_fast-new-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.isdir(target):
            written = set(os.listdir(staging))
            if subfolder_replaces is not None:
                for folder in written:
                    _keep_unwritten(os.path.join(target, folder), os.path.join(staging, folder), subfolder_replaces)
            for entry in os.listdir(target):
                if entry in written or replaced(entry) or _LEGACY_LEFTOVER.match(entry) \
                        or _SAVE_LEFTOVER.match(entry):
                    continue
                _carry_over(os.path.join(target, entry), os.path.join(staging, entry))
            _fsync_directory(staging)
            if _exchange(staging, target):
                pass  # staging now holds the old content, removed below
            else:
                old = os.path.join(parent, f".{base}.deberta_fast-old-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(target, old)
                os.rename(staging, target)
                staging = old
        else:
            os.rename(staging, target)
            staging = None
        _fsync_directory(parent)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


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
