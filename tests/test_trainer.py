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
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "classifier.weight" in changed and any("attention.self.query_proj" in k for k in changed)
