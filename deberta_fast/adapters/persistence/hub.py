"""Adapters on the Hugging Face Hub: ``load_adapter(<repo id>)`` and ``push_adapter_to_hub``.

Downloads and uploads go through huggingface_hub's public API only (``HfApi.repo_info``, ``snapshot_download``,
``HfApi.create_repo``, ``HfApi.upload_folder``). A repository holds exactly what ``save_adapter`` writes plus an
adapter card (README.md), so AdapterHub loads it too (``model.load_adapter("<repo id>")``).

Without network, both directions fail fast with an OSError that says so: with ``HF_HUB_OFFLINE=1`` (or
``local_files_only=True``) a download only looks in the local cache and an upload is refused before any request;
otherwise the first request has a short timeout (``DEBERTA_FAST_HUB_TIMEOUT`` seconds, default 10).
"""

from __future__ import annotations

import os
import re
import tempfile

__all__ = ["HubMixin", "adapter_card", "resolve_adapter_path"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _timeout() -> float:
    value = os.environ.get("DEBERTA_FAST_HUB_TIMEOUT", "10")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"DEBERTA_FAST_HUB_TIMEOUT must be a number of seconds; got {value!r}") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(
        constants.HF_HUB_OFFLINE)


def _library_version() -> str:
    from ... import __version__

    return __version__


def resolve_adapter_path(name_or_path: str, version: str | None = None, cache_dir=None, token=None,
                         local_files_only: bool = False, force_download: bool = False) -> str:
    """A local directory holding the adapter: ``name_or_path`` itself when it is a directory, else a snapshot of
    the Hub repository ``name_or_path`` at revision ``version`` (downloaded, or from the cache when offline)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"adapter_name_or_path must be a directory or a Hub repository id; got {name_or_path!r}")
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or not _REPO_ID.match(name_or_path):
        raise OSError(f"{name_or_path}: not an adapter directory (save_adapter output) and not a Hugging Face Hub "
                      "repository id such as 'user/adapter-name'")
    from huggingface_hub import HfApi, snapshot_download

    offline = local_files_only or _offline()
    revision = version
    try:
        if not offline:
            info = HfApi(library_name="deberta_fast", library_version=_library_version()).repo_info(
                name_or_path, revision=version, token=token, timeout=_timeout())
            revision = info.sha or version
        return snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=offline, force_download=force_download,
                                 library_name="deberta_fast", library_version=_library_version(),
                                 etag_timeout=_timeout())
    except Exception as error:  # huggingface_hub and httpx raise many types for network / repository problems
        where = ("the local Hugging Face cache (offline: HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
                 else "the Hugging Face Hub")
        raise OSError(f"could not load adapter {name_or_path!r} from {where}: {type(error).__name__}: {error}. "
                      "Pass a local directory written by save_adapter, or check the repository id, the network "
                      "and the token.") from error


def adapter_card(model, adapter_name: str, repo_id: str, datasets_tag: str | None = None, tags=None,
                 language: str | None = None, license: str | None = None, metrics=None,
                 architecture_training: str | None = None, results: str | None = None,
                 citation: str | None = None) -> str:
    """The README.md of an adapter repository: YAML metadata (tags incl. "adapter-transformers" so the Hub lists
    it as an adapter, the model type, datasets, language, license, metrics) and a usage section."""
    all_tags = sorted({"adapter-transformers", "deberta_fast", model.config.model_type, *(tags or [])})
    meta = ["tags:", *[f"- {tag}" for tag in all_tags]]
    if datasets_tag:
        meta += ["datasets:", f"- {datasets_tag}"]
    if language:
        meta += ["language:", f"- {language}"]
    if license:
        meta.append(f'license: "{license}"')
    if metrics:
        meta += ["metrics:", *[f"- {metric}" for metric in metrics]]
    base = model.config.name_or_path or "<base model>"
    config = model.adapters_config.get(adapter_name)
    method = config.get("architecture", None) or "bottleneck"
    head = ""
    if adapter_name in getattr(model, "heads", {}):
        head = f", with a {model.heads[adapter_name].config['head_type'].replace('_', ' ')} head"
    trained_on = f" trained on [{datasets_tag}](https://huggingface.co/datasets/{datasets_tag})" if datasets_tag else ""
    placeholder = "(not documented yet)"
    lines = [
        "---", *meta, "---", "",
        f"# {method} adapter `{repo_id}` for `{base}`", "",
        f"A {method} adapter for `{base}`{trained_on}{head}, saved in the AdapterHub file format by deberta_fast.",
        "", "## Usage", "",
        "With deberta_fast:", "", "```python", "from deberta_fast import DebertaV2AdapterModel", "",
        f'model = DebertaV2AdapterModel.from_pretrained("{base}")',
        f'name = model.load_adapter("{repo_id}", set_active=True)', "```", "",
        "With AdapterHub (`pip install adapters`):", "", "```python", "from adapters import AutoAdapterModel", "",
        f'model = AutoAdapterModel.from_pretrained("{base}")',
        f'name = model.load_adapter("{repo_id}", set_active=True)', "```", "",
        "## Architecture and training", "", architecture_training or placeholder, "",
        "## Evaluation results", "", results or placeholder, "",
        "## Citation", "", citation or placeholder, "",
    ]
    return "\n".join(lines)


class HubMixin:
    """push_adapter_to_hub (AdapterHub's signature) and the staging folder it uploads."""

    def prepare_adapter_upload(self, folder: str, adapter_name: str, repo_id: str, datasets_tag: str | None = None,
                               overwrite_adapter_card: bool = False, adapter_card_kwargs: dict | None = None) -> str:
        """Write what push_adapter_to_hub uploads into ``folder``: ``save_adapter(folder, adapter_name)`` plus an
        adapter card README.md (kept if one exists, unless ``overwrite_adapter_card``). Returns ``folder``."""
        self.save_adapter(folder, adapter_name)
        card_path = os.path.join(folder, "README.md")
        if overwrite_adapter_card or not os.path.exists(card_path):
            from .files import atomic_path

            card = adapter_card(self, adapter_name, repo_id, datasets_tag=datasets_tag, **(adapter_card_kwargs or {}))
            with atomic_path(card_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                handle.write(card)
        return folder

    def push_adapter_to_hub(self, repo_id: str, adapter_name: str, datasets_tag: str | None = None,
                            local_path: str | None = None, commit_message: str | None = None,
                            private: bool | None = None, token=None, overwrite_adapter_card: bool = False,
                            create_pr: bool = False, revision: str | None = None, commit_description: str | None = None,
                            adapter_card_kwargs: dict | None = None):
        """Upload adapter ``adapter_name`` (save_adapter files + adapter card) to Hub repository ``repo_id``
        (created if needed). ``local_path``: an existing directory to stage the files in (default: a temporary
        one). Returns huggingface_hub's commit info."""
        self._require_adapter(adapter_name)
        if _offline():
            raise OSError(f"push_adapter_to_hub({repo_id!r}): the Hugging Face Hub is offline (HF_HUB_OFFLINE=1); "
                          "nothing was uploaded")
        if local_path is not None and os.path.isdir(local_path):
            return self._upload(self.prepare_adapter_upload(local_path, adapter_name, repo_id, datasets_tag,
                                                            overwrite_adapter_card, adapter_card_kwargs),
                                repo_id, commit_message, private, token, create_pr, revision, commit_description)
        with tempfile.TemporaryDirectory(prefix="deberta_fast_adapter_") as folder:
            self.prepare_adapter_upload(folder, adapter_name, repo_id, datasets_tag, overwrite_adapter_card,
                                        adapter_card_kwargs)
            return self._upload(folder, repo_id, commit_message, private, token, create_pr, revision,
                                commit_description)

    def _upload(self, folder, repo_id, commit_message, private, token, create_pr, revision, commit_description):
        from huggingface_hub import HfApi

        api = HfApi(library_name="deberta_fast", library_version=_library_version(), token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=folder,
                                     commit_message=commit_message or "Upload adapter with deberta_fast",
                                     commit_description=commit_description, create_pr=create_pr, revision=revision)
        except Exception as error:  # huggingface_hub and httpx raise many types for network / permission problems
            raise OSError(f"push_adapter_to_hub({repo_id!r}) failed: {type(error).__name__}: {error}. Check the "
                          "network, the token (huggingface-cli login) and your rights on the repository.") from error
