"""Composition blocks on DeBERTa, including the setups AdapterHub 1.3.0 breaks on DeBERTa.

Oracle for Parallel / BatchSplit: separate single-adapter runs (Parallel channel c, or BatchSplit row group c, must
equal the run with child c alone). For LoRA / (IA)³ on q and k with share_att_key=True (every DeBERTa-v3
checkpoint), the single runs are AdapterHub's own (tests/fixtures/adapterhub_composition: lora_pair_singles,
ia3_pair_singles) and AdapterHub crashes on the composed setups (shared set: parallel_two_lora,
batchsplit_two_lora). With conv_kernel_size > 0 AdapterHub's Parallel crashes for every method.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from adapters_helpers import (
    TOLERANCE,
    case_json,
    fixture_inputs,
    fixture_model,
    needs_fixtures,
    randomize_adapter_,
    run_like_adapterhub,
    tiny_inputs,
    tiny_model,
)
from deberta_fast.adapters import AdapterSetup, BatchSplit, MultiTask, Parallel, Split, Stack

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapterhub_composition")


def _hidden(model, inputs, setup):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _pair(model, config_a, config_b=None, seeds=(11, 12)):
    model.add_adapter("a", config=config_a)
    model.add_adapter("b", config=config_b or config_a)
    randomize_adapter_(model, "a", seed=seeds[0])
    randomize_adapter_(model, "b", seed=seeds[1])
    return model


def _assert_channels(model, inputs, names=("a", "b")):
    singles = [_hidden(model, inputs, name) for name in names]
    batch = inputs["input_ids"].shape[0]
    parallel = _hidden(model, inputs, Parallel(*names))
    assert parallel.shape[0] == len(names) * batch
    for i, single in enumerate(singles):
        torch.testing.assert_close(parallel[i * batch:(i + 1) * batch], single, rtol=0, atol=TOLERANCE)
    sizes = [batch // 2, batch - batch // 2]
    split = _hidden(model, inputs, BatchSplit(*names[:2], batch_sizes=sizes))
    torch.testing.assert_close(split[:sizes[0]], singles[0][:sizes[0]], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(split[sizes[0]:], singles[1][sizes[0]:], rtol=0, atol=TOLERANCE)
    assert (singles[0] - singles[1]).abs().max() > 100 * TOLERANCE  # the adapters differ


@needs_fixtures
@pytest.mark.parametrize("case", ["lora_pair_singles", "ia3_pair_singles"])
def test_parallel_and_batchsplit_with_qk_lora_match_adapterhubs_single_runs(case):
    """LoRA(q, v) pair and (IA)³(k, v) / (q, k, v) pair on the v3-like fixture base (share_att_key=True): AdapterHub
    raises ValueError / IndexError here; each channel must equal AdapterHub's single-adapter run."""
    reference = load_file(os.path.join(HERE, case, "expected.safetensors"))
    model = fixture_model()
    for name in ("a", "b"):
        model.load_adapter(os.path.join(HERE, case, name), use_safetensors=True)
    inputs = fixture_inputs()
    parallel = _hidden(model, inputs, Parallel("a", "b"))
    torch.testing.assert_close(parallel[:4], reference["single_a"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(parallel[4:], reference["single_b"], rtol=0, atol=TOLERANCE)
    split = _hidden(model, inputs, BatchSplit("a", "b", batch_sizes=[2, 2]))
    torch.testing.assert_close(split[:2], reference["single_a"][:2], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(split[2:], reference["single_b"][2:], rtol=0, atol=TOLERANCE)


@needs_fixtures
@pytest.mark.parametrize("case", ["parallel_two_lora", "batchsplit_two_lora"])
def test_adapterhub_crash_cases_run_here(case):
    """The shared set's crash cases (AdapterHub: ValueError / IndexError): same calls, compared with single runs."""
    spec = case_json(case)
    assert spec["status"].startswith("crashed")
    model = _pair(fixture_model(), "lora")
    _assert_channels(model, fixture_inputs())


@pytest.mark.parametrize("config", ["lora[attn_matrices=['q','k','v']]", "ia3[attn_matrices=['q','k']]",
                                    "lora[attn_matrices=['q','k'], use_gating=True]", "seq_bn", "double_seq_bn",
                                    "prefix_tuning[prefix_length=2, bottleneck_size=8]",
                                    "compacter[reduction_factor=4]"])
def test_parallel_with_conv_layer_and_shared_key(config):
    """conv_kernel_size=3 (v2-xlarge style) with share_att_key=True: AdapterHub's Parallel fails in the conv layer
    for every method; here every channel equals its single run."""
    model = _pair(tiny_model("v3", conv_kernel_size=3, conv_act="gelu"), config)
    _assert_channels(model, tiny_inputs(batch=2))


def test_parallel_and_batchsplit_mix_methods_locations_and_configs():
    """Children of different kinds / locations / bottleneck configurations: AdapterHub fails (KeyError when the
    first child has no module at a location) or applies the first child's pre and the last child's post stage to
    all rows; here every row group is its own single run."""
    model = tiny_model("v3")
    for name, config in (("a", "seq_bn"), ("b", "double_seq_bn"), ("c", "par_bn[reduction_factor=4]"),
                         ("d", "lora[attn_matrices=['q','k']]|prefix_tuning[prefix_length=2, bottleneck_size=8]")):
        model.add_adapter(name, config=config)
        randomize_adapter_(model, name, seed=ord(name))
    inputs = tiny_inputs(batch=2)
    _assert_channels(model, inputs, ("a", "b", "c", "d"))
    _assert_channels(model, inputs, ("d", "a"))
    stacked = _hidden(model, inputs, Parallel(Stack("a", "b"), "c"))
    torch.testing.assert_close(stacked[:2], _hidden(model, inputs, Stack("a", "b")), rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(stacked[2:], _hidden(model, inputs, "c"), rtol=0, atol=TOLERANCE)


def test_parallel_heads_take_one_channel_each():
    model = _pair(tiny_model("v3"), "seq_bn")
    model.add_classification_head("a", num_labels=2)
    model.add_classification_head("b", num_labels=3)
    inputs = tiny_inputs(batch=2)
    model.set_active_adapters(Parallel("a", "b"))
    assert model.active_head == ["a", "b"]
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert len(out) == 2 and out[0].logits.shape == (2, 2) and out[1].logits.shape == (2, 3)
    singles = []
    for name in ("a", "b"):
        model.set_active_adapters(name)
        with torch.no_grad():
            singles.append(model(**inputs, labels=labels))
    for parallel, single in zip(out, singles):
        torch.testing.assert_close(parallel.logits, single.logits, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(out.loss, singles[0].loss + singles[1].loss, rtol=0, atol=1e-6)
    model.add_classification_head("c")
    model.set_active_adapters(Parallel("a", "b"))
    model.active_head = ["a", "b", "c"]
    with pytest.raises(ValueError, match="number of parallel adapters and the number of active heads must match"):
        model(**inputs)


def test_batchsplit_heads_and_setup_context():
    model = _pair(tiny_model("v3"), "lora")
    model.add_classification_head("a", num_labels=2)
    model.add_classification_head("b", num_labels=4)
    inputs = tiny_inputs(batch=3)
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    assert model.active_head == BatchSplit("a", "b", batch_sizes=[1, 2])
    with torch.no_grad():
        out = model(**inputs, labels=torch.tensor([1, 3, 0]))
    assert out[0].logits.shape == (1, 2) and out[1].logits.shape == (2, 4) and out.loss is not None
    model.set_active_adapters(None)
    with AdapterSetup(BatchSplit("a", "b", batch_sizes=[2, 1])), torch.no_grad():
        context_out = model(**inputs)
    assert context_out[0].logits.shape == (2, 2) and context_out[1].logits.shape == (1, 4)
    with AdapterSetup(BatchSplit("a", "b", batch_sizes=[2, 2])), pytest.raises(IndexError, match="batch_sizes"):
        model(**inputs)


def test_split_over_adapters_at_different_locations():
    """Split("a", "b") with a at the feed-forward output only and b at both locations: at the attention output only
    b has a module; its positions run b, the others get the plain sub-layer (AdapterHub drops them and fails).
    Split parity with AdapterHub itself: split_two_bn in test_adapters_composition_fixtures.py."""
    model = _pair(tiny_model("v3"), "seq_bn", "double_seq_bn")
    block = model.deberta.encoder.layer[0].attention.output
    generator = torch.Generator().manual_seed(5)
    hidden, residual = torch.randn(2, 9, 32, generator=generator), torch.randn(2, 9, 32, generator=generator)
    with torch.no_grad():
        with AdapterSetup(Split("a", "b", splits=[4, 5])):
            split = block(hidden, residual)
        with AdapterSetup("b"):
            only_b = block(hidden, residual)
        plain = block.LayerNorm(block.dense(hidden) + residual)
    torch.testing.assert_close(split[:, :4], plain[:, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(split[:, 4:], only_b[:, 4:], rtol=0, atol=1e-6)
    inputs = tiny_inputs(batch=2)
    with pytest.raises(IndexError, match="sum of splits"):
        _hidden(model, inputs, Split("a", "b", splits=[4, 4]))


def test_multitask_routes_rows_by_task_id():
    model = _pair(tiny_model("v3"), "lora[attn_matrices=['q','k','v']]")
    inputs = tiny_inputs(batch=3)
    singles = {name: _hidden(model, inputs, name) for name in ("a", "b")}
    model.set_active_adapters(MultiTask("a", "b"))
    with torch.no_grad():
        routed = model(**inputs, task_ids=[1, 0, 1]).last_hidden_state
        by_name = model(**inputs, task_ids=["b", "a", "b"]).last_hidden_state
    for row, name in enumerate("bab"):
        torch.testing.assert_close(routed[row], singles[name][row], rtol=0, atol=TOLERANCE)
    assert torch.equal(routed, by_name)  # exact: ids and names route the same rows through the same kernels
    with pytest.raises(ValueError, match="task_ids"):
        model(**inputs)


def test_gating_scores_with_shared_attention_key():
    """UniPELT's gated LoRA on q with share_att_key=True: AdapterHub crashes collecting the gate of the position
    projection; here the scores are the content gates, [B, n gates] per location, equal to the gate formula."""
    model = tiny_model("v3")
    model.add_adapter("u", config="unipelt")
    randomize_adapter_(model, "u")
    model.set_active_adapters("u")
    inputs = tiny_inputs(batch=2)
    seen = []
    layer = model.deberta.encoder.layer[1]
    handle = layer.attention.self.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**inputs, output_adapter_gating_scores=True)
    handle.remove()
    scores = out.adapter_gating_scores["u"]
    assert set(scores) == {0, 1}
    assert set(scores[1]) == {"selfattn_lora", "self_prefix", "output_adapter"}
    x = seen[0]
    attention = layer.attention.self
    expected = [torch.sigmoid(proj.loras["u"].gate(x)).mean(dim=1).squeeze(-1)
                for proj in (attention.query_proj, attention.value_proj)]
    assert scores[1]["selfattn_lora"].shape == (2, 2)
    torch.testing.assert_close(torch.as_tensor(scores[1]["selfattn_lora"]), torch.stack(expected, dim=1),
                               rtol=0, atol=1e-6)
    prefix_gate = torch.sigmoid(attention.prefix_tuning.prefix_gates["u"](x)).mean(dim=1).squeeze(-1)
    torch.testing.assert_close(torch.as_tensor(scores[1]["self_prefix"]), prefix_gate, rtol=0, atol=1e-6)


def test_prefix_tuning_saves_as_safetensors(tmp_path):
    """AdapterHub: RuntimeError "Some tensors share memory". Here the pool and its per-layer aliases are written as
    separate tensors and load back bit for bit."""
    model = tiny_model("v3")
    model.add_adapter("p", config="prefix_tuning[prefix_length=3, bottleneck_size=16, use_gating=True]")
    randomize_adapter_(model, "p")
    model.set_active_adapters("p")
    inputs = tiny_inputs()
    before = run_like_adapterhub(model, inputs)["last_hidden_state"]
    model.save_adapter(str(tmp_path), "p", use_safetensors=True)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    aliases = [k for k in saved if ".attention.self.prefix_tuning.pool." in k]
    # exact: the aliases are copies of the stored pool tensors
    assert len(aliases) == 2 * 5 and all(torch.equal(saved[k], saved[k.replace(
        k[:k.index("prefix_tuning.pool.")] + "prefix_tuning.pool.", "deberta.prefix_tuning.")]) for k in aliases)
    fresh = tiny_model("v3")
    fresh.load_adapter(str(tmp_path), use_safetensors=True, set_active=True)
    # the loaded weights are new allocations (another GEMM path may round differently): rounding-level tolerance
    torch.testing.assert_close(run_like_adapterhub(fresh, inputs)["last_hidden_state"], before, rtol=1e-6,
                               atol=1e-6)


def test_prompt_tuning_with_conv_layer_matches_transformers_encoder():
    """AdapterHub crashes (the conv layer gets the [B, L] mask of a [B, P + L] sequence). Oracle: transformers'
    own DebertaV2Encoder on [prompt; embeddings] with a [B, P + L] mask of ones."""
    model = tiny_model("v3", conv_kernel_size=3, conv_act="gelu")
    model.add_adapter("p", config="prompt_tuning[prompt_length=3]")
    randomize_adapter_(model, "p")
    model.set_active_adapters("p")
    inputs = tiny_inputs(batch=2)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state
        twin = hf.DebertaV2Encoder(model.config).eval()
        twin.load_state_dict({k[len("deberta.encoder."):]: v for k, v in model.state_dict().items()
                              if k.startswith("deberta.encoder.") and ".reft_layer." not in k}, strict=False)
        embeddings = model.deberta.embeddings(input_ids=inputs["input_ids"], mask=inputs["attention_mask"])
        prompt = model.deberta.prompt_tuning.prompt_tunings["p"].prompt_embedding.weight
        hidden = torch.cat([prompt.expand(2, -1, -1), embeddings], dim=1)
        reference = twin(hidden, torch.ones(2, 12, dtype=torch.long)).last_hidden_state
    assert ours.shape == (2, 12, 32)
    torch.testing.assert_close(ours, reference, rtol=0, atol=TOLERANCE)
