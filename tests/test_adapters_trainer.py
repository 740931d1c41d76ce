"""AdapterTrainer: adapter-only checkpoints, resume, fusion regularisation in the loss, train_adapter_fusion end to
end (transformers' Trainer underneath)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

from adapters_helpers import tiny_model
from deberta_fast.adapters import AdapterTrainer, Fuse


class _Toy(Dataset):
    def __init__(self, n=8, length=10):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 97, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.labels[index]}


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=0.1,
                  use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, logging_steps=100,
                  remove_unused_columns=False, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def _model_with(adapter_config="seq_bn"):
    model = tiny_model()
    model.add_adapter("a", config=adapter_config)
    model.add_adapter("other", config=adapter_config)
    model.add_classification_head("a", num_labels=2)
    return model


def test_trains_only_the_adapter_and_checkpoints_only_adapters(tmp_path):
    model = _model_with("lora[r=4, intermediate_lora=True]")
    model.train_adapter("a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=_Toy())
    assert trainer.label_names == ["labels"]
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".loras.a." in k or k.startswith("heads.a.") for k in changed)
    assert any(".loras.a." in k for k in changed)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    contents = set(os.listdir(checkpoint))
    assert {"a", "other"} <= contents
    assert not any(name.startswith("model") and name.endswith((".safetensors", ".bin")) for name in contents)
    assert set(os.listdir(checkpoint / "a")) >= {"adapter_config.json", "pytorch_adapter.bin", "head_config.json"}


def test_resume_loads_the_checkpointed_adapters(tmp_path):
    model = _model_with()
    model.train_adapter("a")
    AdapterTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Toy()).train()
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.a." in k}
    fresh = _model_with()
    fresh.train_adapter("a")
    trainer = AdapterTrainer(model=fresh, args=_args(tmp_path, max_steps=2), train_dataset=_Toy())
    trainer._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-2"))
    for key, value in trained.items():
        assert torch.equal(fresh.state_dict()[key], value), key  # loaded tensors are copies


def test_refuses_an_unfrozen_model(tmp_path):
    model = _model_with()
    model.set_active_adapters("a")
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=_Toy())
    with pytest.raises(ValueError, match="not frozen"):
        trainer.train()


def test_needs_an_active_setup(tmp_path):
    with pytest.raises(ValueError, match="active adapter setup"):
        AdapterTrainer(model=_model_with(), args=_args(tmp_path), train_dataset=_Toy())


def test_train_adapter_fusion_end_to_end(tmp_path):
    model = _model_with()
    model.add_adapter_fusion(Fuse("a", "other"))
    model.add_classification_head("a,other", num_labels=2)
    model.train_adapter_fusion(Fuse("a", "other"))
    model.active_head = "a,other"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AdapterTrainer(model=model, args=_args(tmp_path), train_dataset=_Toy())
    assert trainer.train_adapter_fusion
    # the regularisation is part of the loss
    batch = {k: torch.stack([_Toy()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        # make the value matrices differ from the identity so that the regulariser is not 0
        for name, param in model.named_parameters():
            if ".value." in name:
                param.add_(0.05)
        plain = model(**batch).loss
        regularization = model.get_fusion_regularization_loss()
        assert float(regularization) > 1e-4
        assert torch.allclose(trainer.compute_loss(model, dict(batch)), plain + regularization, atol=1e-6)
        before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".adapter_fusion_layer.a,other." in k for k in changed)
    assert all(".adapter_fusion_layer.a,other." in k or k.startswith("heads.a,other.") for k in changed)
    assert "a,other" in os.listdir(tmp_path / "out" / "checkpoint-2")
    assert "adapter_fusion_config.json" in os.listdir(tmp_path / "out" / "checkpoint-2" / "a,other")
