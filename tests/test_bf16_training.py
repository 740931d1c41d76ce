"""bf16 training on the CPU: a train-mode step of an fp32 model under torch.autocast("cpu", bfloat16) runs every fused
op on the native backend (explicitly requested, so a fallback would raise) and its loss and parameter gradients stay
within the numerics policy's bf16 budget (DESIGN.md §5): at most twice the error of transformers' model stepped under
the same autocast, plus a small floor, against a float64 oracle. Dropout is off (config) so that the three runs
compute the same function; the native op's dropout streams are tested in test_attention_cpu_dropout.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.ops.dispatch import use_backend

from configs import make_config, make_mask, transformers_and_fast

FLOOR = 2e-2  # relative to each gradient's largest entry: a few units of bf16's last place


pytestmark = pytest.mark.usefixtures("native_ops")


def step(model, inputs, autocast: bool):
    """Loss and {name: grad} of one train-mode step, the loss mean(last_hidden_state²) over valid positions."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(**inputs).last_hidden_state
    valid = inputs["attention_mask"].bool()
    loss = hidden.double()[valid].pow(2).mean()
    loss.backward()
    return loss.item(), {name: p.grad.double().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config_name,length", [("v3", 65), ("v3", 130), ("v2_xlarge", 64)])
def test_autocast_train_step_on_the_native_ops_within_the_bf16_budget(config_name, length):
    config = make_config(config_name)
    reference, fast = transformers_and_fast(hf.DebertaV2Model, deberta_fast.DebertaV2Model, config)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, config.vocab_size, (2, length), generator=generator),
              "attention_mask": make_mask("right", 2, length)}
    exact_loss, exact = step(reference.double(), inputs, autocast=False)
    reference.float()
    plain_loss, plain = step(reference, inputs, autocast=True)
    with use_backend("cpu"):  # every fused op on the native backend, or an error
        our_loss, ours = step(fast, inputs, autocast=True)
    assert abs(our_loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + FLOOR * abs(exact_loss)
    assert set(ours) == set(exact)
    for name, grad in exact.items():
        # transformers names the same parameters; deberta_fast's tree keeps them
        scale = grad.abs().max().item()
        our_error = (ours[name] - grad).abs().max().item()
        plain_error = (plain[name] - grad).abs().max().item()
        assert our_error <= 2 * plain_error + FLOOR * scale, \
            f"{name}: ours {our_error:.3g}, transformers {plain_error:.3g}, scale {scale:.3g}"
