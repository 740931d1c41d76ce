"""Resumable run state: the trainable weights, optimizer, scheduler, step and history, saved atomically."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

FILE = "checkpoint.pt"


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    losses: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)


def save(directory: str, model, optimizer, scheduler, state: RunState) -> str:
    """Write <directory>/checkpoint.pt through a temporary file and a rename."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    payload = {
        "model": {k: v for k, v in model.state_dict().items() if k in trainable},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "rng": torch.get_rng_state(),
    }
    path = os.path.join(directory, FILE)
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load(directory: str, model, optimizer, scheduler) -> RunState | None:
    """Restore the last checkpoint of ``directory`` into the given objects; None when there is none."""
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"cannot read the checkpoint {path}: {error}") from None
    missing = [k for k in payload["model"] if k not in model.state_dict()]
    if missing:
        raise ValueError(f"checkpoint {path} has weights this model does not have: {missing[:5]}")
    model.load_state_dict(payload["model"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return RunState(**payload["state"])
