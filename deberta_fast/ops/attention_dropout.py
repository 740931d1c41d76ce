"""Counter-based attention dropout: the keep mask of the native CPU op and the Triton kernels, in pure PyTorch.

Probability (b, h, i, k) of a [B, H, L, P + L] attention (query i, key k in the op's key order: P prefix keys, then
the L content keys) is kept when

    x = Philox4x32-10(counters = (i, b·H + h, k, 0), key = (seed mod 2^32, seed div 2^32)).word0
    y = x read as int32, folded to ~x when negative
    keep = float32(y) · 4.6566127342e-10 >= float32(dropout_p)                    (all in float32)

and kept probabilities are scaled by 1 / (1 - dropout_p). That is Triton's ``tl.philox`` / ``uint_to_uniform_float``
as ``deberta_fast/triton_kernels/_common.py`` (dropout_keep) uses them, and ``csrc/attention_dropout.h`` on the CPU:
the mask depends only on (seed, b, h, i, k), so kernels regenerate it in the backward pass instead of storing it, and
every backend that uses this stream drops the same probabilities for the same seed, whatever its tiling or threads.
It is not transformers' stream (``torch.nn.functional.dropout``'s bernoulli draws): the reference backend keeps
that one.
"""

from __future__ import annotations

import torch

PHILOX_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10


def draw_seed(device=None) -> torch.Tensor:
    """int64 [1] seed in [0, 2^62) from torch's default generator of ``device`` (CPU by default): one draw per call,
    so consecutive calls get different masks and ``torch.manual_seed`` makes the sequence repeatable."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _mul_wide(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of x · factor for int64 tensors holding uint32 values (no int64 overflow)."""
    low_product = (x & 0xFFFF) * factor
    middle = (x >> 16) * factor + (low_product >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """The four output words (int64 tensors holding uint32) of Philox4x32-10 on broadcastable int64 counters, under
    key (seed mod 2^32, seed div 2^32)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        a_hi, a_lo = _mul_wide(c0, _ROUND_A)
        b_hi, b_lo = _mul_wide(c2, _ROUND_B)
        c0, c2, c1, c3 = b_hi ^ c1 ^ k0, a_hi ^ c3 ^ k1, b_lo, a_lo
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_word0(c0, c1, c2, c3, seed: int) -> torch.Tensor:
    """First output word (int64 holding a uint32) of Philox4x32-10 on broadcastable int64 counter tensors."""
    return philox4x32(c0, c1, c2, c3, seed)[0]


def checked_seed(seed, dropout_p: float) -> int:
    """``seed`` (an int or an int64 tensor with one element) as an int, after checking seed in [0, 2^63) and
    dropout_p in [0, 1); raises ValueError naming the argument otherwise."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0].item())
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63); got {seed}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    return seed


def keep_of_word(word: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """bool, shape of ``word`` (int64 holding a uint32): the module docstring's threshold test, all in float32."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    uniform = folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
    return uniform >= torch.tensor(dropout_p, dtype=torch.float32)


def attention_keep_mask(seed, batch: int, heads: int, length: int, num_keys: int, dropout_p: float) -> torch.Tensor:
    """bool [B, H, L, num_keys] (num_keys = P + L): True where the probability is kept (module docstring).

    seed: int in [0, 2^63) or an int64 tensor with one element. Memory is O(B·H·L·num_keys): for tests and oracles.
    """
    seed = checked_seed(seed, dropout_p)
    if dropout_p == 0.0:
        return torch.ones(batch, heads, length, num_keys, dtype=torch.bool)
    bh = torch.arange(batch * heads, dtype=torch.int64).view(-1, 1, 1)
    rows = torch.arange(length, dtype=torch.int64).view(1, -1, 1)
    keys = torch.arange(num_keys, dtype=torch.int64).view(1, 1, -1)
    word = philox_word0(rows, bh, keys, torch.zeros((), dtype=torch.int64), seed)
    return keep_of_word(word, dropout_p).view(batch, heads, length, num_keys)
