"""The fine-tuning run behind ``deberta-fast train``: an adapter (or the whole model) and a classification head.

Runs in one process or under ``torchrun --nproc_per_node=N`` (DistributedDataParallel; gloo on CPU, nccl on
CUDA). The global batch is split evenly over the processes and every process walks the same seeded order, so a
run with N processes computes the same losses as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist

from ..models.embedding import zero_grad
from ..ops.dispatch import use_backend
from . import checkpoint
from .data import bundled_path, check_labels, label_names, read_labelled
from .metrics import accuracy, macro_f1
from .options import TrainOptions


class TrainingDiverged(ArithmeticError):
    """The training loss stopped being finite; nothing of the run was saved after the last good checkpoint."""


class _World:
    """rank / world size from torchrun's environment; a single process otherwise."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.size

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def from_main(self, value):
        """The main process's ``value`` (any picklable object), on every process."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _load_tokenizer(options: TrainOptions):
    if options.model is None:
        from .tokenizer import default_tokenizer

        return default_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(options.model)


def _build_model(options: TrainOptions, tokenizer, labels: list[str], world: _World, log):
    from ..adapters import DebertaV2AdapterModel

    if options.model is not None:
        model = DebertaV2AdapterModel.from_pretrained(options.model)
    else:
        from .default_model import default_config

        config = default_config(len(tokenizer), options.max_length)
        if options.dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = options.dropout
        _seed_everything(options.seed)
        model = DebertaV2AdapterModel(config)
        if options.mlm_steps and world.main:
            from .mlm import masked_lm_warmup
            from .tokenizer import bundled_corpus

            log(f"masked-LM warm-up: {options.mlm_steps} steps on the bundled corpus")
            losses = masked_lm_warmup(model.deberta, config, tokenizer, bundled_corpus(), options.mlm_steps,
                                      options.batch_size, options.max_length, options.mlm_learning_rate,
                                      options.seed)
            log(f"masked-LM loss: {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if options.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = options.dropout
    _seed_everything(options.seed + 1)
    id2label = dict(enumerate(labels))
    name = options.adapter_name
    if options.adapter == "full":
        model.add_classification_head(name, num_labels=len(labels), id2label=id2label)
        model.freeze_model(False)
        model.active_head = name
    else:
        model.add_adapter(name, config=options.adapter)
        model.add_classification_head(name, num_labels=len(labels), id2label=id2label)
        model.train_adapter(name)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batches(encoded: list[list[int]], labels: list[int], order: list[int], batch_size: int, pad_id: int,
             world: _World):
    """This process's share of each global batch, padded to its own longest row: (input_ids, mask, labels)."""
    share = batch_size // world.size
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start + world.rank * share: start + (world.rank + 1) * share]
        yield _pad([encoded[i] for i in rows], pad_id) + (torch.tensor([labels[i] for i in rows]),)


def _pad(sequences: list[list[int]], pad_id: int):
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def _schedule(options: TrainOptions, total_steps: int):
    warmup = int(options.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if options.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if options.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _autocast(options: TrainOptions, device: torch.device):
    if options.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if options.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, encoded, labels, options: TrainOptions, pad_id: int, device) -> dict:
    model.eval()
    predictions = []
    for start in range(0, len(encoded), 128):
        ids, mask = _pad(encoded[start:start + 128], pad_id)
        with _autocast(options, device):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        predictions += logits.argmax(-1).tolist()
    model.train()
    num_classes = max(max(labels), max(predictions)) + 1
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels, num_classes)}


def train(options: TrainOptions) -> dict:
    """Run the fine-tuning; returns the final metrics (also written to <output_dir>/metrics.json)."""
    options.validate()
    world = _World()
    if world.main:
        options.check_output_dir()  # before any data is read or model built: an unwritable folder loses nothing
    log_handle = open(options.log_file, "a") if (options.log_file and world.main) else None

    def log(message: str) -> None:
        if world.main:
            print(message, flush=True)
            if log_handle:
                log_handle.write(message + "\n")
                log_handle.flush()

    tokenizer = _load_tokenizer(options)
    train_data = read_labelled(options.train_file or bundled_path("train.jsonl"), options.text_column,
                               options.label_column)
    eval_data = read_labelled(options.eval_file or bundled_path("test.jsonl"), options.text_column,
                              options.label_column)
    check_labels(train_data, eval_data)
    labels = label_names(train_data)
    label_id = {name: index for index, name in enumerate(labels)}
    if options.batch_size % world.size:
        raise ValueError(f"--batch-size: the global batch ({options.batch_size}) must divide evenly over "
                         f"{world.size} processes")

    def encode(texts):
        return tokenizer(texts, truncation=True, max_length=options.max_length)["input_ids"]

    train_ids, eval_ids = encode(train_data.texts), encode(eval_data.texts)
    train_labels = [label_id[x] for x in train_data.labels]
    eval_labels = [label_id[x] for x in eval_data.labels]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    with use_backend(options.backend):
        model = _build_model(options, tokenizer, labels, world, log).to(world.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        log(f"labels: {labels}; trainable parameters: {sum(p.numel() for p in trainable):,} of "
            f"{sum(p.numel() for p in model.parameters()):,}; processes: {world.size}; device: {world.device}")
        core = model
        if world.size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
        steps_per_epoch = len(train_ids) // options.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"--batch-size: {options.batch_size} is larger than the training set "
                             f"({len(train_ids)} rows)")
        total_steps = options.max_steps or max(1, int(options.epochs * steps_per_epoch))
        optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=options.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options, total_steps))
        state = checkpoint.RunState()
        if options.resume:
            state = checkpoint.load(options.output_dir, core, optimizer, scheduler, options) or state
            if state.step:
                log(f"resumed from step {state.step}")
        progress = None
        if options.progress and world.main:
            from tqdm.auto import tqdm

            progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)
        model.train()
        started, tokens = time.perf_counter(), 0
        end = min(total_steps, state.step + options.stop_after) if options.stop_after else total_steps
        while state.step < end:
            order = list(range(len(train_ids)))
            random.Random(options.seed * 1000 + state.epoch).shuffle(order)
            skip = state.step - state.epoch * steps_per_epoch
            for index, (ids, mask, targets) in enumerate(_batches(train_ids, train_labels, order,
                                                                  options.batch_size, pad_id, world)):
                if index < skip:
                    continue
                if state.step >= end:
                    break
                with _autocast(options, world.device):
                    loss = model(input_ids=ids.to(world.device), attention_mask=mask.to(world.device),
                                 labels=targets.to(world.device)).loss
                value = world.mean(loss.item())
                if not math.isfinite(value):
                    saved = (f"{options.output_dir} keeps the checkpoint of step {state.evaluations[-1]['step']}"
                             if state.evaluations else "nothing was saved")
                    raise TrainingDiverged(
                        f"step {state.step + 1}: the training loss is {value} (not finite); stopped before updating "
                        f"the weights, {saved}. Lower --learning-rate (now {options.learning_rate:g}) or check the "
                        "data")
                loss.backward()
                optimizer.step()
                scheduler.step()
                zero_grad(core, optimizer)  # the word embedding's .grad is kept, zeroed in place
                state.step += 1
                state.losses.append(value)
                tokens += int(mask.sum()) * world.size
                if progress is not None:
                    rate = tokens / max(1e-9, time.perf_counter() - started)
                    progress.set_postfix(loss=f"{state.losses[-1]:.4f}", tok_s=f"{rate:,.0f}")
                    progress.update(1)
                if options.eval_every and state.step % options.eval_every == 0 and state.step < end:
                    _evaluate_and_save(core, eval_ids, eval_labels, options, pad_id, world, state, optimizer,
                                       scheduler, log)
            else:
                state.epoch += 1
        if progress is not None:
            progress.close()
        _evaluate_and_save(core, eval_ids, eval_labels, options, pad_id, world, state, optimizer, scheduler, log)
        elapsed = time.perf_counter() - started
    result = {**state.evaluations[-1], "step": state.step, "train_seconds": elapsed, "processes": world.size,
              "labels": labels, "adapter": options.adapter, "losses": state.losses,
              "evaluations": state.evaluations}
    if world.main:
        _save_outputs(core, options, result, log)
    world.barrier()
    if log_handle:
        log_handle.close()
    return result


def _evaluate_and_save(core, eval_ids, eval_labels, options, pad_id, world, state, optimizer, scheduler, log):
    metrics = None
    if world.main:
        metrics = evaluate(core, eval_ids, eval_labels, options, pad_id, world.device)
        log(f"step {state.step}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
    state.evaluations.append({"step": state.step, **world.from_main(metrics)})
    if world.main:
        checkpoint.save(options.output_dir, core, optimizer, scheduler, state, options)
    world.barrier()


def _save_outputs(core, options: TrainOptions, result: dict, log) -> None:
    name = options.adapter_name
    if options.adapter == "full":
        core.save_pretrained(os.path.join(options.output_dir, "model"))
        core.save_head(os.path.join(options.output_dir, "head"), name)
    else:
        core.save_adapter(os.path.join(options.output_dir, "adapter"), name, with_head=True)
    metrics_path = os.path.join(options.output_dir, "metrics.json")
    with open(metrics_path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(metrics_path + ".tmp", metrics_path)
    from .plot import plot_run

    plot_path = plot_run(result, os.path.join(options.output_dir, "training.png"))
    log(f"final: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} after {result['step']} steps "
        f"({result['train_seconds']:.0f} s); saved to {options.output_dir}"
        + (f"; plot {plot_path}" if plot_path else "; no plot: matplotlib is missing (pip install matplotlib)"))
