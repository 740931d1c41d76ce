"""Ops: pure-PyTorch references, custom ops and backend dispatch. Imports only kernels below it."""

from .attention import disentangled_attention
from .attention_reference import disentangled_attention_reference
from .dispatch import BACKENDS, BackendUnavailable, requested_backend, use_backend
from .positions import RelativePositionSpec, distance_slot_table, log_bucket_position, slots_of_distances

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "RelativePositionSpec",
    "disentangled_attention",
    "disentangled_attention_reference",
    "distance_slot_table",
    "log_bucket_position",
    "requested_backend",
    "slots_of_distances",
    "use_backend",
]
