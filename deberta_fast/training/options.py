"""Options of a fine-tuning run, checked up front so that a bad value names the option and what was expected."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainOptions:
    """Everything ``deberta-fast train`` takes; defaults give the embedded default run."""

    output_dir: str = "runs/default"
    model: str | None = None  # a DeBERTa-v2/v3 checkpoint directory; None = the embedded default model
    adapter: str = "full"  # an AdapterHub config string ("lora", "seq_bn[reduction_factor=8]", ...) or "full"
    adapter_name: str = "task"
    train_file: str | None = None  # None = bundled movie_reviews/train.jsonl
    eval_file: str | None = None  # None = bundled movie_reviews/test.jsonl
    text_column: str = "text"
    label_column: str = "label"
    epochs: float = 2.0
    batch_size: int = 32  # global: split evenly over the processes of a torchrun
    learning_rate: float = 1e-3
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 64
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    backend: str = "auto"
    eval_every: int = 200  # steps; 0 = only at the end
    resume: bool = False
    mlm_steps: int = 0
    mlm_learning_rate: float = 1e-3
    max_steps: int = 0  # 0 = epochs decide
    stop_after: int = 0  # end this invocation after N steps (the schedule still spans the whole run); 0 = never
    dropout: float | None = None  # override the model's hidden/attention dropout (0 for exact comparisons)
    progress: bool = True
    log_file: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainOptions":
        from ..ops.dispatch import check_backend_name

        def need(condition, option, expected, got):
            if not condition:
                raise ValueError(f"--{option.replace('_', '-')}: expected {expected}; got {got!r}")

        need(self.epochs > 0, "epochs", "a number > 0", self.epochs)
        need(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        need(self.learning_rate > 0, "learning_rate", "a number > 0", self.learning_rate)
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)", self.warmup_ratio)
        need(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        need(self.eval_every >= 0, "eval_every", "an integer >= 0", self.eval_every)
        need(self.mlm_steps >= 0, "mlm_steps", "an integer >= 0", self.mlm_steps)
        need(self.max_steps >= 0, "max_steps", "an integer >= 0", self.max_steps)
        need(self.stop_after >= 0, "stop_after", "an integer >= 0", self.stop_after)
        need(self.dropout is None or 0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        need(bool(self.adapter), "adapter", "an AdapterHub config string or 'full'", self.adapter)
        try:
            check_backend_name(self.backend)
        except ValueError as error:
            raise ValueError(f"--backend: {error}") from None
        for option in ("train_file", "eval_file"):
            path = getattr(self, option)
            need(path is None or os.path.isfile(path), option, "an existing .jsonl or .csv file", path)
        need(self.model is None or os.path.isdir(self.model), "model", "a checkpoint directory", self.model)
        if self.model is not None and self.mlm_steps:
            raise ValueError("--mlm-steps: the masked-LM warm-up is for the embedded default model; drop --model or "
                             "set --mlm-steps 0")
        return self
