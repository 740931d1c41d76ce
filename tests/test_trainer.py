"""transformers.Trainer trains deberta_fast's sequence classifier."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import deberta_fast
from configs import make_config


class _Toy(Dataset):
    def __init__(self, n=16, length=12):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 97, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.labels[index]}


def test_trainer_runs_training_steps(tmp_path):
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2ForSequenceClassification(make_config("v3", num_labels=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, dataloader_num_workers=0)
    result = Trainer(model=model, args=args, train_dataset=_Toy()).train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]  # untouched keep bits
    assert "classifier.weight" in changed and any("attention.self.query_proj" in k for k in changed)


def test_trainer_trains_only_the_adapter_and_its_head(tmp_path):
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2AdapterModel(make_config("v3"))
    model.add_adapter("task", config="lora[r=4, attn_matrices=['q','k','v']]")
    model.add_classification_head("task", num_labels=2)
    model.add_classification_head("other", num_labels=2)
    model.train_adapter("task")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, weight_decay=0.1)
    result = Trainer(model=model, args=args, train_dataset=_Toy()).train()
    assert result.global_step == 3
    # exact: a tensor the optimiser never updates keeps its bits
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing was trained"
    assert all(".loras.task." in k or k.startswith("heads.task.") for k in changed), sorted(changed)[:5]
    assert any(".loras.task.lora_B" in k for k in changed) and any(k.startswith("heads.task.") for k in changed)
