"""Resumable run state: the trainable weights, optimizer, scheduler, step and history, saved atomically.

The checkpoint also records the options that define the run (TrainOptions.run_defining) and the model's
architecture; ``load`` refuses a checkpoint whose run or model differs, listing every difference, before anything is
restored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

FILE = "checkpoint.pt"
# config.json entries that decide the shapes and the math of the model.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size", "max_position_embeddings", "type_vocab_size", "relative_attention",
                     "position_buckets", "max_relative_positions", "pos_att_type", "share_att_key", "hidden_act",
                     "position_biased_input", "norm_rel_ebd")


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    losses: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)


def architecture(model) -> dict:
    config = model.config
    return {key: _plain(getattr(config, key, None)) for key in ARCHITECTURE_KEYS}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def save(directory: str, model, optimizer, scheduler, state: RunState, options=None) -> str:
    """Write <directory>/checkpoint.pt: a temporary file in the same folder, synced, then renamed over the old one
    (a crash leaves the previous checkpoint or the new one, never a mix)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    payload = {
        "model": {k: v for k, v in model.state_dict().items() if k in trainable},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "rng": torch.get_rng_state(),
        "options": options.run_defining() if options is not None else None,
        "architecture": architecture(model),
    }
    path = os.path.join(directory, FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def load(directory: str, model, optimizer, scheduler, options=None) -> RunState | None:
    """Restore the last checkpoint of ``directory`` into the given objects; None when there is none. ValueError
    (naming the file and listing the differences) when it belongs to another run or another model."""
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"cannot read the checkpoint {path}: {error}") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "scheduler", "state", "rng"} <= set(payload):
        raise ValueError(f"{path}: not a deberta-fast train checkpoint")
    saved_architecture = payload.get("architecture")
    if saved_architecture is not None:
        current = architecture(model)
        changed = [f"{k}: {saved_architecture.get(k)!r} -> {current.get(k)!r}" for k in ARCHITECTURE_KEYS
                   if saved_architecture.get(k) != current.get(k)]
        if changed:
            raise ValueError(f"{path} was written for another model configuration ({'; '.join(changed)}); use "
                             "the --model of that run or another --output-dir")
    if options is not None and payload.get("options") is not None:
        differences = options.resume_differences(payload["options"])
        if differences:
            raise ValueError(f"--resume: the options differ from the run that wrote {path}: "
                             + "; ".join(differences) + ". Use the original values or another --output-dir")
    state_dict = model.state_dict()
    missing = [k for k in payload["model"] if k not in state_dict]
    if missing:
        raise ValueError(f"checkpoint {path} has weights this model does not have: {missing[:5]}")
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(state_dict[k].shape)}" for k, v in payload["model"].items()
              if tuple(v.shape) != tuple(state_dict[k].shape)]
    if shapes:
        raise ValueError(f"{path} was written for another model configuration (shape mismatches: {shapes[:5]})")
    model.load_state_dict(payload["model"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return RunState(**payload["state"])
