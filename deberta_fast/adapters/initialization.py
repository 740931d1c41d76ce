"""Weight initialisation helpers for adapter modules.

``init_weights_seed`` makes every module of an adapter start from the same values (AdapterHub's meaning). AdapterHub
reseeds the global torch RNG for that; here each module draws from its own ``torch.Generator`` seeded with the
value, so the global random stream of the program is left untouched.
"""

from __future__ import annotations

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
