"""Weight initialisation helpers for adapter modules.

``init_weights_seed`` makes every module of an adapter start from the same values (AdapterHub's meaning). AdapterHub
reseeds the global torch RNG for that; here each module draws from its own ``torch.Generator`` seeded with the
value, so the global random stream of the program is left untouched.
"""

from __future__ import annotations

import contextlib

import torch


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (None when no seed is given: use the global RNG)."""
    if not seed:
        return None
    device = torch.device(device)
    if device.type == "meta":
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


@contextlib.contextmanager
def seeded_init(seed: int | None, device=None):
    """Inside the block, torch's default generators (CPU, and ``device``'s when it is a CUDA device) start from
    ``seed``, so modules built or initialised there (e.g. nn.Linear's own init, orthogonal parametrisations) draw
    the same values for the same seed; the previous generator states are restored on exit. No seed: no effect."""
    if not seed:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(int(seed))
        yield
