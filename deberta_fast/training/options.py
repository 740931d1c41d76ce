"""Options of a fine-tuning run, checked up front so that a bad value names the option and what was expected."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
# Options that --resume lets change (they do not alter what the remaining steps compute); --max-steps may only grow.
RESUME_MAY_CHANGE = ("eval_every", "max_steps", "stop_after", "backend", "gradient_checkpointing", "progress",
                     "log_file", "output_dir", "resume")


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

        def number(option, low, high=math.inf, low_open=False, high_open=False):
            value = getattr(self, option)
            low_ok = value > low if low_open else value >= low
            high_ok = value < high if high_open else value <= high
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            need(ok and low_ok and high_ok, option, f"a finite number in {interval}", value)

        number("epochs", 0, 1e6, low_open=True)
        need(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        number("learning_rate", 0, 10, low_open=True)
        number("weight_decay", 0, 1e3)
        number("mlm_learning_rate", 0, 10, low_open=True)
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        number("warmup_ratio", 0, 1, high_open=True)
        need(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        need(self.eval_every >= 0, "eval_every", "an integer >= 0", self.eval_every)
        need(self.mlm_steps >= 0, "mlm_steps", "an integer >= 0", self.mlm_steps)
        need(self.max_steps >= 0, "max_steps", "an integer >= 0", self.max_steps)
        need(self.stop_after >= 0, "stop_after", "an integer >= 0", self.stop_after)
        if self.dropout is not None:
            number("dropout", 0, 1, high_open=True)
        need(bool(self.adapter), "adapter", "an AdapterHub config string or 'full'", self.adapter)
        try:
            check_backend_name(self.backend)
        except ValueError as error:
            raise ValueError(f"--backend: {error}") from None
        for option in ("train_file", "eval_file"):
            path = getattr(self, option)
            need(path is None or os.path.isfile(path), option, "an existing .jsonl or .csv file", path)
        need(self.model is None or os.path.isdir(self.model), "model", "a checkpoint directory", self.model)
        if self.model is not None and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model: {self.model} has no config.json; expected a DeBERTa-v2/v3 checkpoint "
                             "directory in transformers' format (config.json, weights, tokenizer files)")
        if self.model is not None and self.mlm_steps:
            raise ValueError("--mlm-steps: the masked-LM warm-up is for the embedded default model; drop --model or "
                             "set --mlm-steps 0")
        return self

    def check_output_dir(self) -> None:
        """Create --output-dir and write a probe file there, so that an unwritable folder fails before training."""
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.output_dir, prefix=".write-test-"):
                pass
        except OSError as error:
            raise OSError(f"--output-dir: cannot write to {self.output_dir!r} ({error.strerror or error})") from None

    def run_defining(self) -> dict:
        """The options a resumed run must share with the run that wrote the checkpoint."""
        values = asdict(self)
        values.pop("extra")
        return {k: v for k, v in values.items() if k not in RESUME_MAY_CHANGE or k == "max_steps"}

    def resume_differences(self, saved: dict) -> list[str]:
        """Why this run cannot continue the one whose options are ``saved`` (empty when it can)."""
        differences = []
        current = self.run_defining()
        for key in sorted(set(current) | set(saved)):
            old, new = saved.get(key), current.get(key)
            if key == "max_steps":
                if old != new and not (old and new and new > old):
                    differences.append(f"--max-steps {old} -> {new} (it may only grow from a value > 0)")
            elif old != new:
                differences.append(f"--{key.replace('_', '-')} {old!r} -> {new!r}")
        return differences
