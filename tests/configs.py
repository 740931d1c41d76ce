"""Named DeBERTa-v2 configurations and model builders for the parity tests.

Models are tiny, built from seeded random weights, then perturbed (biases, LayerNorms, relative embeddings)
so that nothing is trivially 0 or 1, saved by transformers and loaded by deberta_fast (and the other way).
"""

from __future__ import annotations

import tempfile

import torch
from transformers import DebertaV2Config

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    max_position_embeddings=320,
    type_vocab_size=0,
    layer_norm_eps=1e-7,
)

# name -> overrides of BASE. "small_buckets" reaches the log buckets and saturated slots at short lengths.
CONFIGS = {
    "v3": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=256, max_relative_positions=-1,
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
               max_position_embeddings=512),
    "v2_xlarge": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=256,
                      max_relative_positions=-1, share_att_key=False, norm_rel_ebd="layer_norm",
                      position_biased_input=False, conv_kernel_size=3, conv_act="gelu", attention_head_size=8,
                      max_position_embeddings=512),
    "c2p_only": dict(relative_attention=True, pos_att_type="c2p", position_buckets=16, max_relative_positions=64,
                     share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False),
    "p2c_only": dict(relative_attention=True, pos_att_type="p2c", position_buckets=16, max_relative_positions=64,
                     share_att_key=False, position_biased_input=False),
    "absolute": dict(relative_attention=False, pos_att_type="p2c|c2p", position_biased_input=True, type_vocab_size=2),
    "unbucketed": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=-1, max_relative_positions=48,
                       share_att_key=True, position_biased_input=True),
    "odd_head_dim": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=16,
                         max_relative_positions=64, share_att_key=True, hidden_size=36, num_attention_heads=3,
                         norm_rel_ebd="layer_norm", position_biased_input=False),
    "small_buckets": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8,
                          max_relative_positions=24, share_att_key=False, norm_rel_ebd="layer_norm",
                          position_biased_input=False, conv_kernel_size=3),
}


def make_config(name: str, **extra) -> DebertaV2Config:
    return DebertaV2Config(**{**BASE, **CONFIGS[name], **extra})


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every parameter: biases and LayerNorm weights stop being 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def transformers_and_fast(hf_class, fast_class, config, seed: int = 0):
    """A seeded, perturbed transformers model and deberta_fast's twin loaded from its save_pretrained dir."""
    torch.manual_seed(seed)
    reference = perturb_(hf_class(config), seed=seed + 1).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        fast = fast_class.from_pretrained(directory).eval()
    return reference, fast


MASKS = ("none", "right", "left", "holes", "single")


def make_mask(kind: str, batch: int, length: int) -> torch.Tensor | None:
    """[B, L] int64 masks. right/left: padding at the end / start of some rows; holes: scattered zeros;
    single: one row keeps a single valid token."""
    if kind == "none":
        return None
    mask = torch.ones(batch, length, dtype=torch.long)
    if kind == "right":
        for row in range(1, batch):
            mask[row, max(1, length - row * max(1, length // 3)):] = 0
    elif kind == "left":
        for row in range(1, batch):
            mask[row, : min(length - 1, row * max(1, length // 3))] = 0
    elif kind == "holes":
        generator = torch.Generator().manual_seed(3)
        mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
        mask[:, 0] = 1
    elif kind == "single":
        mask[-1] = 0
        mask[-1, length // 2] = 1
    else:
        raise ValueError(kind)
    return mask
