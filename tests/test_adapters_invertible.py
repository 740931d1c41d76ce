"""Invertible adapters (seq_bn_inv / double_seq_bn_inv, NICE and GLOW blocks on the input embeddings, inverted
before a masked-LM head's decoder).

tests/fixtures/adapterhub_invertible/ was written by AdapterHub 1.3.0 itself (generate.py there): adapters with a
NICE invertible adapter, masked-LM / classification heads, all weights redrawn, saved with save_adapter.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from adapters_helpers import TOLERANCE, fixture_inputs, fixture_model, needs_fixtures, tiny_inputs, tiny_model
from deberta_fast.adapters import DoubleSeqBnInvConfig, SeqBnInvConfig
from deberta_fast.adapters.methods.invertible import GLOWCouplingBlock, NICECouplingBlock

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapterhub_invertible")
with open(os.path.join(HERE, "cases.json"), encoding="utf-8") as _handle:
    CASES = json.load(_handle)

BLOCKS = {"nice": NICECouplingBlock, "glow": GLOWCouplingBlock}
SHAPES = {"even": (2, 5, 32), "odd": (3, 4, 33)}


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


@needs_fixtures
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapterhub_invertible_adapter_reproduces_its_outputs(case):
    model = fixture_model()
    assert model.load_adapter(os.path.join(HERE, case, "a0"), set_active=True) == "a0"
    assert "a0" in model.deberta.invertible_adapters
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    with torch.no_grad():
        out = model(**fixture_inputs(), output_hidden_states=True)
    assert float((out.hidden_states[-1] - expected["last_hidden_state"]).abs().max()) <= TOLERANCE
    if "logits" in expected:
        assert float((out.logits - expected["logits"]).abs().max()) <= TOLERANCE


@needs_fixtures
def test_saved_invertible_adapter_has_adapterhub_keys(tmp_path):
    model = fixture_model()
    model.load_adapter(os.path.join(HERE, "seq_bn_inv_mlm", "a0"))
    model.save_adapter(str(tmp_path), "a0")
    ours = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    theirs = torch.load(os.path.join(HERE, "seq_bn_inv_mlm", "a0", "pytorch_adapter.bin"), weights_only=True)
    assert sorted(ours) == sorted(theirs)
    assert any(".invertible_adapters.a0.F.0.weight" in k for k in ours)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=0), key  # copied tensors, no arithmetic


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_block_inverse_undoes_forward(kind, shape):
    batch, length, channels = SHAPES[shape]
    block = BLOCKS[kind](channels, non_linearity="gelu", reduction_factor=2)
    _randomize(block, seed=5)
    x = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(1))
    y = block(x)
    assert y.shape == x.shape
    assert float((y - x).abs().max()) > 1e-2  # the block does something
    assert torch.allclose(block(y, rev=True), x, atol=1e-5)
    assert torch.allclose(block(block(x, rev=True)), x, atol=1e-5)


def test_nice_block_formula():
    block = NICECouplingBlock(6, non_linearity="relu", reduction_factor=1)
    _randomize(block, seed=2)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))

    def subnet(seq, v):
        return seq[2](torch.relu(seq[0](v)))

    y1 = x[..., :3] + subnet(block.F, x[..., 3:])
    y2 = x[..., 3:] + subnet(block.G, y1)
    assert torch.allclose(block(x), torch.cat([y1, y2], -1), atol=1e-6)


def test_glow_block_formula():
    block = GLOWCouplingBlock(4, non_linearity="tanh", reduction_factor=1)
    _randomize(block, seed=3)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def scale(s):
        return torch.exp(5.0 * 0.636 * torch.atan(s / 5.0))

    def subnet(seq, v):
        return seq[2](torch.tanh(seq[0](v)))

    r2 = subnet(block.s2, x[..., 2:])
    y1 = scale(r2[..., :2]) * x[..., :2] + r2[..., 2:]
    r1 = subnet(block.s1, y1)
    y2 = scale(r1[..., :2]) * x[..., 2:] + r1[..., 2:]
    assert torch.allclose(block(x), torch.cat([y1, y2], -1), atol=1e-6)


@pytest.mark.parametrize("config", ["seq_bn_inv", "double_seq_bn_inv", "seq_bn_inv[inv_adapter='glow']"])
def test_invertible_adapter_in_model(config):
    model = tiny_model()
    inputs = tiny_inputs()
    model.add_masked_lm_head("lm")
    with torch.no_grad():
        base = model(**inputs, head="lm", output_hidden_states=True)
    model.add_adapter("inv", config=config)
    block = model.deberta.invertible_adapters["inv"]
    _randomize(block, seed=4)
    model.set_active_adapters("inv")
    model.active_head = "lm"
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        # the embedding output goes through the block; the encoder sees it
        embeddings = model.deberta.embeddings(input_ids=inputs["input_ids"], mask=inputs["attention_mask"])
        assert torch.allclose(out.hidden_states[0], block(embeddings), atol=1e-6)
        # the masked-LM head inverts the block right before its decoder
        head = model.heads["lm"]
        transformed = head[2](head[1](head[0](out.hidden_states[-1])))
        logits = head[3](block(transformed, rev=True))
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert float((out.logits - base.logits).abs().max()) > 1e-3
    assert model.get_adapter("inv")[-1]["invertible"] is block


def test_invertible_adapter_lifecycle(tmp_path):
    model = tiny_model()
    assert model.supports_adapter("invertible")
    assert model.supports_adapter(SeqBnInvConfig())
    model.add_adapter("a", config=DoubleSeqBnInvConfig())
    model.add_adapter("b", config="seq_bn")
    assert "b" not in model.deberta.invertible_adapters
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in model.deberta.invertible_adapters["a"].named_parameters(prefix="deberta."
                                                                                       "invertible_adapters.a")} \
        <= trainable
    # saving and loading reproduces the output
    _randomize(model.deberta.invertible_adapters["a"], seed=8)
    model.eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    model.save_adapter(str(tmp_path / "a"), "a")
    other = tiny_model()
    other.load_adapter(str(tmp_path / "a"), set_active=True)
    with torch.no_grad():
        assert torch.allclose(other(**inputs).last_hidden_state, before, atol=1e-6)
    # deletion removes the block
    model.delete_adapter("a")
    assert "a" not in model.deberta.invertible_adapters
    assert not any(".invertible_adapters.a." in n for n, _ in model.named_parameters())


def test_invertible_adapters_average_linearly():
    model = tiny_model()
    for i, name in enumerate(("x", "y")):
        model.add_adapter(name, config="seq_bn_inv")
        _randomize(model.deberta.invertible_adapters[name], seed=10 + i)
    model.average_adapter("avg", ["x", "y"], weights=[0.25, 0.75])
    blocks = model.deberta.invertible_adapters
    for key, value in blocks["avg"].state_dict().items():
        expected = 0.25 * blocks["x"].state_dict()[key] + 0.75 * blocks["y"].state_dict()[key]
        assert torch.allclose(value, expected, atol=1e-7), key


def test_invertible_adapter_init_weights_seed():
    first, second = tiny_model(), tiny_model(seed=5)
    first.add_adapter("a", config="seq_bn_inv[init_weights_seed=3]")
    torch.manual_seed(99)
    second.add_adapter("a", config="seq_bn_inv[init_weights_seed=3]")
    for (key, p1), (_, p2) in zip(first.deberta.invertible_adapters["a"].named_parameters(),
                                  second.deberta.invertible_adapters["a"].named_parameters()):
        assert torch.equal(p1, p2), key  # same seed, same generator, same draws
    weight = first.deberta.invertible_adapters["a"].F[0].weight
    assert 0.01 < float(weight.std()) < 0.04  # N(0, 0.02)
