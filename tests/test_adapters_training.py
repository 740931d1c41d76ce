"""train_adapter / freeze_model / merge_adapter / reset_adapter / average_adapter / adapter_summary."""

from __future__ import annotations

import pytest
import torch

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from deberta_fast.adapters import IA3Config, LoRAConfig


def _trainable(model) -> set:
    return {name for name, param in model.named_parameters() if param.requires_grad}


_OWNED = (".loras.x.", ".adapters.x.", ".prefix_tunings.x.", ".prefix_gates.x.", ".prompt_tunings.x.", ".refts.x.",
          ".shared_parameters.x.")


@pytest.mark.parametrize("config", ["lora[attn_matrices=['q','k','v'], output_lora=True]", "ia3", "seq_bn",
                                    "double_seq_bn", "scaled_par_bn",
                                    "prefix_tuning[prefix_length=2, bottleneck_size=8, use_gating=True]",
                                    "prompt_tuning[prompt_length=2]", "compacter[reduction_factor=4]",
                                    "loreft[dropout=0.0]", "unipelt"])
def test_train_adapter_trains_only_that_adapter_and_its_head(config):
    model = tiny_model("v3")
    model.add_adapter("x", config=config)
    model.add_adapter("other", config="lora[r=2]")
    model.add_classification_head("x", num_labels=3)
    model.add_tagging_head("other", num_labels=2)
    model.train_adapter("x")
    assert model.training and model.active_adapters.flatten() == {"x"} and model.active_head == "x"
    trainable = _trainable(model)
    assert trainable and all(any(o in n for o in _OWNED) or n.startswith("heads.x.") for n in trainable)
    assert {n for n in trainable if n.startswith("heads.")} == {n for n, _ in model.named_parameters()
                                                               if n.startswith("heads.x.")}
    assert any(".x." in n and not n.startswith("heads.") for n in trainable)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    inputs = tiny_inputs()
    for _ in range(2):
        loss = model(**inputs, labels=torch.tensor([0, 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}  # untouched tensors keep their bits
    assert changed, "the trained adapter did not change"
    assert all(k in {n for n in trainable} for k in changed), sorted(changed - trainable)
    assert any(not k.startswith("heads.") for k in changed)


def test_train_embeddings_and_tied_masked_lm_decoder():
    model = tiny_model("v3")
    model.add_adapter("m", config="seq_bn")
    model.add_masked_lm_head("m")
    decoder = model.heads["m"][3]
    assert decoder.weight is model.deberta.embeddings.word_embeddings.weight
    model.train_adapter("m")
    assert not decoder.weight.requires_grad and not decoder.bias.requires_grad
    assert model.heads["m"][0].weight.requires_grad and model.heads["m"][2].weight.requires_grad
    model.train_adapter("m", train_embeddings=True)
    assert model.deberta.embeddings.word_embeddings.weight.requires_grad and decoder.bias.requires_grad


def test_freeze_model_and_summary():
    model = tiny_model("v3")
    model.add_adapter("bn", config="seq_bn")
    model.add_adapter("lo", config="lora")
    model.add_classification_head("bn")
    model.train_adapter("bn")
    rows = model.adapter_summary(as_dict=True)
    base = sum(p.numel() for p in model.deberta.parameters())
    bn_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters.bn." in n)
    lo_params = sum(p.numel() for n, p in model.named_parameters() if ".loras.lo." in n)
    assert rows[0] == {"name": "bn", "architecture": "bottleneck", "#param": bn_params, "active": True,
                       "train": True, "%param": bn_params / (base - bn_params - lo_params) * 100}
    assert rows[1]["architecture"] == "lora" and rows[1]["active"] is False and rows[1]["train"] is False
    assert rows[2] == {"name": "Full model", "#param": base - bn_params - lo_params, "%param": 100.0, "train": False}
    table = model.adapter_summary().split("\n")
    assert table[0] == "=" * 80 and table[2] == "-" * 80 and table[-1] == "=" * 80 and table[-3] == "-" * 80
    assert table[1] == "Name                     Architecture         #Param      %Param  Active   Train"
    assert table[3] == f"{'bn':<25}{'bottleneck':<15}{bn_params:>12,}{rows[0]['%param']:>12.3f}{1:>8}{1:>8}"
    assert table[-2].startswith("Full model") and table[-2].endswith("       0")
    model.freeze_model(False)
    assert all(p.requires_grad for p in model.deberta.parameters())
    assert model.adapter_summary(as_dict=True)[-1]["train"] is True


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
    IA3Config(),
    IA3Config(attn_matrices=["q", "k", "v"], output_lora=True),
], ids=["lora", "ia3", "ia3_all"])
def test_merge_equals_unmerged_and_reset_restores_exactly(config):
    model = tiny_model("v3")
    model.add_adapter("a", config=config, set_active=True)
    randomize_adapter_(model, "a", seed=4)
    biases = [p for n, p in model.named_parameters() if n.endswith("proj.bias") or n.endswith("dense.bias")]
    assert all(b.abs().max() > 0.05 for b in biases)  # the base has non-zero biases (the IA³ bug needs them)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).last_hidden_state
        model.merge_adapter("a")
        merged = model(**inputs).last_hidden_state
        model.merge_adapter("a")  # merging the merged adapter again is a no-op
        # exact: the same merged weight tensors, the same kernels, the same inputs
        assert torch.equal(model(**inputs).last_hidden_state, merged)
    assert (merged - unmerged).abs().max() <= 1e-5
    changed = [k for k in original if not torch.equal(original[k], model.state_dict()[k])]
    assert changed and all(k.endswith("weight") or k.endswith("bias") for k in changed)
    model.reset_adapter()
    # exact: reset puts the original weight tensors themselves back
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, unmerged)


def test_set_active_adapters_resets_merges_and_save_pretrained_saves_unmerged(tmp_path):
    model = tiny_model("v3")
    model.add_adapter("a", config="lora", set_active=True)
    randomize_adapter_(model, "a")
    weight = model.deberta.encoder.layer[0].attention.self.query_proj.weight.detach().clone()
    model.merge_adapter("a")
    model.save_pretrained(str(tmp_path))
    assert model.deberta.encoder.layer[0].attention.self.query_proj.merged == "a"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["deberta.encoder.layer.0.attention.self.query_proj.weight"], weight)  # stored copy
    model.set_active_adapters("a")
    assert torch.equal(model.deberta.encoder.layer[0].attention.self.query_proj.weight, weight)


def test_average_adapter_linear_and_negate_b():
    model = tiny_model("v3")
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, config="lora[r=2]")
        randomize_adapter_(model, name, seed=seed)
    model.average_adapter("avg", {"a": 1.0, "b": 3.0})
    model.average_adapter("neg", ["a", "b"], weights=[-1.0, 2.0], combine_strategy="lora_linear_only_negate_b",
                          normalize_weights=False)
    model.average_adapter("eq", ["a", "b"])
    q = model.deberta.encoder.layer[1].attention.self.value_proj.loras
    torch.testing.assert_close(q["avg"].lora_A, 0.25 * q["a"].lora_A + 0.75 * q["b"].lora_A, rtol=0, atol=1e-7)
    torch.testing.assert_close(q["avg"].lora_B, 0.25 * q["a"].lora_B + 0.75 * q["b"].lora_B, rtol=0, atol=1e-7)
    torch.testing.assert_close(q["neg"].lora_A, 1.0 * q["a"].lora_A + 2.0 * q["b"].lora_A, rtol=0, atol=1e-7)
    torch.testing.assert_close(q["neg"].lora_B, -1.0 * q["a"].lora_B + 2.0 * q["b"].lora_B, rtol=0, atol=1e-7)
    torch.testing.assert_close(q["eq"].lora_A, 0.5 * q["a"].lora_A + 0.5 * q["b"].lora_A, rtol=0, atol=1e-7)
    model.add_adapter("bn1", config="seq_bn")
    model.add_adapter("bn2", config="seq_bn[init_weights='houlsby']")  # init_weights is ignored by the check
    model.average_adapter("bnavg", ["bn1", "bn2"], weights=[0.5, 0.5])
    block = model.deberta.encoder.layer[0].output.adapters
    torch.testing.assert_close(block["bnavg"].adapter_up.weight,
                               0.5 * block["bn1"].adapter_up.weight + 0.5 * block["bn2"].adapter_up.weight)
    with pytest.raises(ValueError, match="not supported"):
        model.average_adapter("x", ["bn1", "bn2"], combine_strategy="lora_linear_only_negate_b")
    assert "x" not in model.adapters_config


def test_delete_adapter_removes_modules_and_unmerges():
    model = tiny_model("v3")
    model.add_adapter("a", config="lora", set_active=True)
    randomize_adapter_(model, "a")
    weight = model.deberta.encoder.layer[0].attention.self.query_proj.weight.detach().clone()
    model.merge_adapter("a")
    model.delete_adapter("a")
    assert not model.has_adapters() and model.active_adapters is None and model.get_adapter("a") == {}
    assert not any(".loras.a." in k for k in model.state_dict())
    # exact: unmerging restores the stored original weight, not a subtraction
    assert torch.equal(model.deberta.encoder.layer[0].attention.self.query_proj.weight, weight)
    model.delete_adapter("a")  # unknown names are skipped, as in AdapterHub


def test_get_adapter_iter_layers_and_apply():
    model = tiny_model("v3")
    model.add_adapter("a", config="lora[attn_matrices=['q','k'], intermediate_lora=True]|double_seq_bn")
    found = model.get_adapter("a")
    assert set(found) == {0, 1}
    assert set(found[0]) == {"selfattn_lora", "intermediate_lora", "mh_adapter", "output_adapter"}
    assert len(found[0]["selfattn_lora"]) == 2
    assert [i for i, _ in model.iter_layers()] == [0, 1]
    order = []
    model.apply_to_adapter_layers(lambda i, layer: order.append((i, layer.location_key)))
    # AdapterHub's order within a layer (reference §4)
    assert order[:9] == [(0, "selfattn_lora")] * 3 + [(0, "self_prefix"), (0, "mh_adapter"), (0, "intermediate_lora"),
                                                      (0, "output_adapter"), (0, "output_lora"), (0, "output_reft")]
    visited = []
    model.apply_to_basemodel_childs(lambda i, child: visited.append((i, child.adapter_modules_name)))
    assert visited == [(-1, "prompt_tunings"), (-1, "invertible_adapters")]
    assert model.adapter_summary(as_dict=True)[0]["architecture"] == "union"


def test_gradients_with_activation_checkpointing_are_unchanged():
    model = tiny_model("v3")
    model.add_adapter("a", config="lora|seq_bn")
    randomize_adapter_(model, "a")
    model.add_classification_head("a")
    model.train_adapter("a")
    labels = torch.tensor([0, 1])

    def gradients():
        model.zero_grad()
        model(**tiny_inputs(), labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for _, layer in model.iter_layers())
    checkpointed = gradients()
    assert set(plain) == set(checkpointed) and any(".loras.a." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7)
