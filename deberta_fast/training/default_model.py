"""The embedded default model: a small DeBERTa-v3-style configuration, randomly initialised."""

from __future__ import annotations

from transformers import DebertaV2Config


def default_config(vocab_size: int, max_length: int = 128) -> DebertaV2Config:
    """v3 style (shared position projections, log buckets, LayerNorm'd relative embeddings, no absolute
    positions), small enough to train on a 2-core CPU in minutes: hidden 128, 2 layers, 4 heads."""
    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=max(128, max_length),
        relative_attention=True,
        position_buckets=32,
        max_relative_positions=128,
        pos_att_type="p2c|c2p",
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
        layer_norm_eps=1e-7,
    )
