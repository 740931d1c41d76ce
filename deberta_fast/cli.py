"""``deberta-fast`` (also ``python -m deberta_fast``): ``train`` a fine-tuning run, ``bench`` the benchmark suite."""

from __future__ import annotations

import argparse
import os
import sys

from .training.options import PRECISIONS, RESUME_MAY_CHANGE, SCHEDULES, TrainOptions

TRAIN_HELP = """\
Fine-tune an adapter (any AdapterHub config string) or the whole model ("full") together with a classification
head on a labelled text dataset (JSONL or CSV with text and label columns). Without --model it trains the
embedded default: a small DeBERTa-v3-style model (random init; --mlm-steps warms it up by masked-LM on the
bundled corpus) on the bundled movie-review snippets, with a SentencePiece tokenizer trained on that corpus at
first use. Under torchrun the global --batch-size is split over the processes.

examples:
  deberta-fast train                                   # the embedded default run, prints accuracy at the end
  deberta-fast train --adapter "lora[r=16]" --mlm-steps 300
  deberta-fast train --model path/to/deberta-v3-base --adapter seq_bn --train-file t.csv --eval-file e.csv
  torchrun --nproc_per_node=2 -m deberta_fast train --batch-size 32
"""


def _train_parser(sub) -> None:
    parser = sub.add_parser("train", help="fine-tune an adapter or the whole model with a classification head",
                            description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainOptions()
    parser.add_argument("--output-dir", default=d.output_dir,
                        help=f"where the adapter/head (AdapterHub format), metrics.json, the plot and the resumable "
                             f"checkpoint go (default {d.output_dir})")
    parser.add_argument("--model", default=None,
                        help="a DeBERTa-v2/v3 checkpoint directory (transformers format); default: the embedded "
                             "small v3-style model with random weights")
    parser.add_argument("--adapter", default=d.adapter,
                        help='an AdapterHub config string such as "lora", "ia3", "seq_bn[reduction_factor=8]", or '
                             f'"full" to fine-tune every weight (default {d.adapter})')
    parser.add_argument("--adapter-name", default=d.adapter_name, help="name of the adapter and head")
    parser.add_argument("--train-file", default=None, help="training data, .jsonl or .csv (default: bundled)")
    parser.add_argument("--eval-file", default=None, help="evaluation data, .jsonl or .csv (default: bundled)")
    parser.add_argument("--text-column", default=d.text_column, help="name of the text column/key")
    parser.add_argument("--label-column", default=d.label_column,
                        help="name of the label column/key; label names are mapped to ids in sorted order and "
                             "stored in the head's id2label")
    parser.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    parser.add_argument("--max-steps", type=int, default=d.max_steps,
                        help="stop after this many optimizer steps (default 0: --epochs decides)")
    parser.add_argument("--stop-after", type=int, default=d.stop_after,
                        help="end this invocation after N optimizer steps, with a checkpoint, while the learning-rate "
                             "schedule still spans the whole run; continue later with --resume (default 0: never)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"global batch size, split over torchrun processes (default {d.batch_size})")
    parser.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate,
                        help=f"peak AdamW learning rate (default {d.learning_rate})")
    parser.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                        help=f"learning-rate decay after the warm-up (default {d.schedule})")
    parser.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                        help=f"fraction of the steps with a linear learning-rate warm-up (default {d.warmup_ratio})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    parser.add_argument("--max-length", type=int, default=d.max_length,
                        help=f"truncate texts to this many tokens (default {d.max_length})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, order and dropout")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                        help="fp32, or bf16 / fp16 autocast (default fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute layer activations in the backward pass to save memory")
    parser.add_argument("--backend", default=None,
                        help="attention / adapter op backend: auto, reference, triton, cpu (default: the "
                             "DEBERTA_FAST_BACKEND environment variable when set, else auto)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help=f"evaluate (accuracy, macro-F1) and checkpoint every N steps; 0: only at the end "
                             f"(default {d.eval_every})")
    may_change = ", ".join(f"--{o.replace('_', '-')}" for o in RESUME_MAY_CHANGE
                           if o not in ("max_steps", "resume", "output_dir", "progress"))
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --output-dir; the run's other options must be the "
                             f"ones it was started with (checked). May change: {may_change}, --no-progress, and "
                             "--max-steps upward")
    parser.add_argument("--mlm-steps", type=int, default=d.mlm_steps,
                        help="masked-LM warm-up steps of the embedded default model before fine-tuning (default 0)")
    parser.add_argument("--mlm-learning-rate", type=float, default=d.mlm_learning_rate,
                        help="learning rate of the masked-LM warm-up")
    parser.add_argument("--dropout", type=float, default=None,
                        help="override the model's hidden and attention dropout (0 makes runs exactly comparable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-file", default=None, help="also append the log lines to this file")


def _bench_parser(sub) -> None:
    from .benchmark.suite import add_arguments

    parser = sub.add_parser("bench", help="run the benchmark suite over every provider this machine has",
                            description="Benchmark the attention op, the full model (forward and forward+backward), "
                                        "the LoRA and bottleneck ops over every provider available here; print a "
                                        "table, write CSV (and a PNG when matplotlib is installed).",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deberta-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench}")
    _train_parser(sub)
    _bench_parser(sub)
    return parser


def _package_errors() -> tuple:
    """The errors of bad input or of the environment that deberta-fast reports as one line (exit code 2)."""
    from .ops.dispatch import BackendUnavailable
    from .ops.native_cache import BuildFailed
    from .training.loop import TrainingDiverged

    return ValueError, OSError, BackendUnavailable, BuildFailed, TrainingDiverged


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .ops.dispatch import ENV_VAR
            from .training.loop import train

            values = vars(args).copy()
            values.pop("command")
            values["progress"] = not values.pop("no_progress")
            if values["backend"] is None:
                from_env = os.environ.get(ENV_VAR, "").strip()
                values["backend"] = from_env or "auto"
                if from_env and from_env not in ("auto", "reference", "triton", "cpu"):
                    raise ValueError(f"environment variable {ENV_VAR} (the default of --backend): expected auto, "
                                     f"reference, triton or cpu; got {from_env!r}")
            result = train(TrainOptions(**values))
            print(f"test accuracy: {result['accuracy']:.4f}  macro-F1: {result['macro_f1']:.4f}")
            return 0
        from .benchmark.suite import run_from_args

        run_from_args(args)
        return 0
    except _package_errors() as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.filename and error.strerror:
            message = f"{error.filename}: {error.strerror}"
        parser.exit(2, f"deberta-fast {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
