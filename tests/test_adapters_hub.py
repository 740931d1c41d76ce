"""load_adapter from a Hugging Face Hub id and push_adapter_to_hub, without touching the network.

The upload folder is checked through ``prepare_adapter_upload`` (what push_adapter_to_hub stages) and through
push_adapter_to_hub itself with huggingface_hub's HfApi.create_repo / upload_folder replaced by recorders; offline
(HF_HUB_OFFLINE=1, which the tests set) both directions must fail at once with a clear OSError.
"""

from __future__ import annotations

import os
import time

import huggingface_hub
import pytest
import torch

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model


@pytest.fixture
def model():
    model = tiny_model("v3")
    model.add_adapter("sst", config="lora[attn_matrices=['q','k','v']]")
    randomize_adapter_(model, "sst")
    model.add_classification_head("sst", num_labels=2)
    return model


def _listing(folder) -> dict:
    result = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            result[name] = handle.read()
    return result


def test_upload_folder_is_save_adapter_plus_card(model, tmp_path, monkeypatch):
    model.save_adapter(str(tmp_path / "saved"), "sst")
    staged = model.prepare_adapter_upload(str(tmp_path / "staged"), "sst", "me/sst-adapter", datasets_tag="glue",
                                          adapter_card_kwargs={"license": "apache-2.0", "tags": ["sentiment"]})
    files = _listing(staged)
    card = files.pop("README.md").decode("utf-8")
    assert files == _listing(tmp_path / "saved")
    assert card.startswith("---\ntags:\n") and "- adapter-transformers\n" in card and "- deberta-v2\n" in card
    assert "- sentiment\n" in card and "datasets:\n- glue\n" in card and 'license: "apache-2.0"' in card
    assert 'load_adapter("me/sst-adapter", set_active=True)' in card and "classification head" in card

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["files"] = _listing(kwargs["folder_path"])
        return "commit-info"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = model.push_adapter_to_hub("me/sst-adapter", "sst", datasets_tag="glue", private=True,
                                       adapter_card_kwargs={"license": "apache-2.0", "tags": ["sentiment"]})
    assert result == "commit-info"
    assert calls["create_repo"] == ("me/sst-adapter", {"private": True, "exist_ok": True})
    assert calls["upload_folder"]["repo_id"] == "me/sst-adapter"
    uploaded = dict(calls["files"])
    assert uploaded.pop("README.md").decode("utf-8") == card
    assert uploaded == _listing(tmp_path / "saved")
    # an existing card in local_path is kept unless overwrite_adapter_card
    local = tmp_path / "local"
    local.mkdir()
    (local / "README.md").write_text("my own card")
    model.push_adapter_to_hub("me/sst-adapter", "sst", local_path=str(local))
    assert calls["files"]["README.md"] == b"my own card"


def test_offline_hub_fails_fast_with_a_clear_message(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(OSError, match="offline"):
        model.push_adapter_to_hub("me/sst-adapter", "sst")
    with pytest.raises(OSError, match="could not load adapter 'me/never-cached-adapter'.*offline"):
        model.load_adapter("me/never-cached-adapter")
    assert time.monotonic() - started < 5
    assert set(model.adapters_config) == {"sst"}
    with pytest.raises(OSError, match="not an adapter directory"):
        model.load_adapter("./no/such/dir")


def test_load_adapter_from_a_hub_id_uses_the_snapshot(model, tmp_path, monkeypatch):
    model.save_adapter(str(tmp_path / "repo"), "sst")
    requests = []

    def snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs))
        return str(tmp_path / "repo")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    fresh = tiny_model("v3")
    name = fresh.load_adapter("me/sst-adapter", version="v1", load_as="hub", set_active=True)
    assert name == "hub" and requests[0][0] == "me/sst-adapter"
    assert requests[0][1]["revision"] == "v1" and requests[0][1]["local_files_only"] is True
    assert requests[0][1]["library_name"] == "deberta_fast"
    model.set_active_adapters("sst")
    inputs = tiny_inputs()
    with torch.no_grad():
        # the fresh model's weights are new allocations: another GEMM path may round differently
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=1e-6, atol=1e-6)
