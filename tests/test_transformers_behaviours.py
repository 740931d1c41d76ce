"""What transformers' own DeBERTa-v2 model tests check, checked for deberta_fast's classes and for patched models.

transformers tests its DeBERTa-v2 classes with a tiny "model tester" config (pos_att_type "None", no relative
attention) through the generic model-tester mixin: output shapes, attention / hidden-state outputs (from the call and
from the config, attentions last in the tuple), tuple / dict equivalence, determinism, batching, save / load,
training with and without gradient checkpointing, gradients reaching retained hidden states and attentions,
embedding resizing and get / set, missing and tied keys, inputs_embeds, classification problem types, loading with
mismatched shapes. The same behaviours are checked here (written independently) for

- ``deberta_fast``: deberta_fast's DebertaV2* classes;
- ``patched``: transformers' classes passed through ``patch_deberta`` (after loading, for save / load);

on the tester config and on v3-like and v2-like variants of it with relative attention on. The oracle is
transformers' own model built from the same seed (same weights): outputs within 1e-5, as the numerics policy says.
Head masking and pruning are not tested: transformers 5 removed them from DeBERTa-v2.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file
from transformers import DebertaV2Config
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import deberta_fast
from deberta_fast.models.embedding import RowGradEmbedding
from configs import perturb_

# The model tester's config (transformers' test_modeling_deberta_v2), and two variants with relative attention.
TESTER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
              max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02, relative_attention=False,
              position_biased_input=True, pos_att_type="None")
VARIANTS = {
    "tester": {},
    "v3_like": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=256, share_att_key=True,
                    norm_rel_ebd="layer_norm", position_biased_input=False),
    "v2_like": dict(relative_attention=True, pos_att_type="p2c|c2p", max_relative_positions=-1, share_att_key=False,
                    conv_kernel_size=3, conv_act="gelu"),
}
BATCH, LENGTH, CHOICES, LABELS = 13, 7, 4, 3
CLASSES = ("DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
           "DebertaV2ForTokenClassification", "DebertaV2ForQuestionAnswering", "DebertaV2ForMultipleChoice")
HEADS = CLASSES[1:]
FLAVORS = ("deberta_fast", "patched")
TOL = 1e-5


def config_of(variant: str, name: str = "DebertaV2Model", **extra) -> DebertaV2Config:
    """The variant's config; the classification heads get LABELS labels, as the tester sets (QA keeps 2)."""
    labels = {"num_labels": LABELS} if name.endswith(("SequenceClassification", "TokenClassification")) else {}
    return DebertaV2Config(**{**TESTER, **labels, **VARIANTS[variant], **extra})


def build(flavor: str, name: str, config, seed: int = 0):
    """The model of ``flavor`` and transformers' twin, both from ``seed`` (equal weights), in eval mode."""
    torch.manual_seed(seed)
    reference = getattr(hf, name)(config).eval()
    if flavor == "patched":
        return deberta_fast.patch_deberta(copy.deepcopy(reference)), reference
    torch.manual_seed(seed)
    return getattr(deberta_fast, name)(config).eval(), reference


def load(flavor: str, name: str, directory: str, **kwargs):
    if flavor == "patched":
        loaded = getattr(hf, name).from_pretrained(directory, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        deberta_fast.patch_deberta(model)
        return loaded
    return getattr(deberta_fast, name).from_pretrained(directory, **kwargs)


def inputs_for(name: str, labels: bool = False, seed: int = 0) -> dict:
    """The tester's inputs: random ids, a random 0/1 mask (rows may be all padding), random token types."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, TESTER["vocab_size"], (BATCH, LENGTH), generator=generator),
        "attention_mask": torch.randint(0, 2, (BATCH, LENGTH), generator=generator),
        "token_type_ids": torch.randint(0, TESTER["type_vocab_size"], (BATCH, LENGTH), generator=generator),
    }
    if name == "DebertaV2ForMultipleChoice":
        inputs = {k: v.unsqueeze(1).expand(-1, CHOICES, -1).contiguous() for k, v in inputs.items()}
    if labels:
        if name in ("DebertaV2ForMaskedLM", "DebertaV2ForTokenClassification"):
            high = TESTER["vocab_size"] if name == "DebertaV2ForMaskedLM" else LABELS
            inputs["labels"] = torch.randint(0, high, (BATCH, LENGTH), generator=generator)
        elif name == "DebertaV2ForSequenceClassification":
            inputs["labels"] = torch.randint(0, LABELS, (BATCH,), generator=generator)
        elif name == "DebertaV2ForMultipleChoice":
            inputs["labels"] = torch.randint(0, CHOICES, (BATCH,), generator=generator)
        elif name == "DebertaV2ForQuestionAnswering":
            inputs["start_positions"] = torch.randint(0, LENGTH, (BATCH,), generator=generator)
            inputs["end_positions"] = torch.randint(0, LENGTH, (BATCH,), generator=generator)
    return inputs


def flat_tensors(output) -> list[torch.Tensor]:
    """Every tensor of a model output (ModelOutput or tuple), nested tuples flattened, in order."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    tensors = []
    for item in items:
        if isinstance(item, (tuple, list)):
            tensors.extend(flat_tensors(item))
        elif isinstance(item, torch.Tensor):
            tensors.append(item)
    return tensors


def assert_outputs_close(ours, theirs, tol=TOL):
    ours, theirs = flat_tensors(ours), flat_tensors(theirs)
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, (index, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"output tensor {index}")


# ------------------------------------------------------------------------------------------------ forward outputs


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_losses_hidden_states_and_attentions_match_transformers(variant, name, flavor):
    config = config_of(variant, name)
    model, reference = build(flavor, name, config)
    if flavor == "deberta_fast":
        for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), key  # exact: the same seeded draws fill the same modules
    perturb_(model, seed=5)
    perturb_(reference, seed=5)
    inputs = inputs_for(name, labels=name != "DebertaV2Model")
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True, output_hidden_states=True)
        theirs = reference(**inputs, output_attentions=True, output_hidden_states=True)
        plain = model(**inputs)  # no attention probabilities requested: the fused CPU op serves it when built
        theirs_plain = reference(**inputs)
    rows = BATCH * CHOICES if name == "DebertaV2ForMultipleChoice" else BATCH
    assert len(ours.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (rows, LENGTH, config.hidden_size) for h in ours.hidden_states)
    assert len(ours.attentions) == config.num_hidden_layers
    assert all(a.shape == (rows, config.num_attention_heads, LENGTH, LENGTH) for a in ours.attentions)
    if name != "DebertaV2Model":
        assert ours.loss.shape == ()
    assert_outputs_close(ours, theirs)
    assert_outputs_close(plain, theirs_plain)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
def test_output_flags_from_config_tuple_order_and_determinism(name, flavor):
    config = config_of("v3_like", name)
    config.output_attentions = True
    model, _ = build(flavor, name, config)
    inputs = inputs_for(name, labels=name != "DebertaV2Model")
    with torch.no_grad():
        by_config = model(**inputs)
        as_dict = model(**inputs, output_hidden_states=True, return_dict=True)
        as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
        again = model(**inputs, output_hidden_states=True, return_dict=False)
    assert by_config.attentions is not None and len(by_config.attentions) == config.num_hidden_layers
    assert by_config.hidden_states is None
    # attentions come last, hidden states just before them
    assert as_tuple[-1] is not None and len(as_tuple[-1]) == config.num_hidden_layers
    assert len(as_tuple[-2]) == config.num_hidden_layers + 1
    assert len(as_tuple) == len(by_config.to_tuple()) + 1 == len(as_dict.to_tuple())
    assert_outputs_close(as_tuple, as_dict, tol=1e-6)
    # exact: one model, the same kernels on the same inputs twice in one process
    for a, b in zip(flat_tensors(as_tuple), flat_tensors(again)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batching_equivalence(variant, name):
    """A row alone gives what it gives inside the batch (transformers allows 1e-3; the math is the same here)."""
    model, _ = build("deberta_fast", name, config_of(variant, name))
    inputs = inputs_for(name)
    with torch.no_grad():
        batched = model(**inputs, output_hidden_states=True, output_attentions=True)
        single = model(**{k: v[:1] for k, v in inputs.items()}, output_hidden_states=True, output_attentions=True)
    for whole, row in zip(flat_tensors(batched), flat_tensors(single)):
        torch.testing.assert_close(whole[: row.shape[0]], row, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_retained_hidden_states_and_attentions(variant, flavor):
    """The returned attention probabilities are part of the graph: their gradient equals transformers'."""
    config = config_of(variant, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, reference = build(flavor, "DebertaV2Model", config)
    inputs = inputs_for("DebertaV2Model")
    grads = []
    for net in (model, reference):
        out = net(**inputs, output_hidden_states=True, output_attentions=True)
        hidden, probs = out.hidden_states[0], out.attentions[0]
        hidden.retain_grad()
        probs.retain_grad()
        out.last_hidden_state.flatten()[0].backward(retain_graph=True)
        assert hidden.grad is not None and probs.grad is not None
        grads.append((hidden.grad, probs.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=TOL)
    # in training mode (dropout on) too, as transformers' test runs it
    model.train()
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    out.hidden_states[0].retain_grad()
    out.attentions[0].retain_grad()
    out.last_hidden_state.flatten()[0].backward()
    assert out.hidden_states[0].grad is not None and out.attentions[0].grad is not None


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", ["tester", "v2_like"])
def test_save_load_round_trip(variant, name, flavor, tmp_path):
    model, _ = build(flavor, name, config_of(variant, name))
    perturb_(model)
    inputs = inputs_for(name)
    with torch.no_grad():
        before = model(**inputs)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "generation_config.json").exists()  # these models cannot generate
    loaded = load(flavor, name, str(tmp_path)).eval()
    fast_attention = [m for m in loaded.modules() if isinstance(m, deberta_fast.models.DisentangledSelfAttention)]
    assert len(fast_attention) == TESTER["num_hidden_layers"]
    state = loaded.state_dict()
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # exact: stored copies
    with torch.no_grad():
        after = loaded(**inputs)
    assert_outputs_close(after, before, tol=1e-6)  # reloaded weights are new allocations: rounding-level tolerance


@pytest.mark.parametrize("name", HEADS)
def test_missing_keys_tied_weights_and_safetensors(name, tmp_path):
    config = config_of("v3_like", name)
    model, _ = build("deberta_fast", name, config)
    model.deberta.save_pretrained(str(tmp_path / "base"))
    head_model, info = getattr(deberta_fast, name).from_pretrained(str(tmp_path / "base"), output_loading_info=True)
    assert info["missing_keys"], "a head loaded from a base checkpoint must report its head weights missing"
    assert not info["unexpected_keys"]

    model.save_pretrained(str(tmp_path / "full"))
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    reloaded, info = getattr(deberta_fast, name).from_pretrained(str(tmp_path / "full"), output_loading_info=True)
    assert not info["missing_keys"]
    pointers = {}
    for key, value in model.state_dict().items():
        pointers.setdefault(value.data_ptr(), []).append(key)
    for keys in (group for group in pointers.values() if len(group) > 1):
        assert len({reloaded.state_dict()[k].data_ptr() for k in keys}) == 1, keys  # ties survive the reload
    for key in saved:
        torch.testing.assert_close(reloaded.state_dict()[key], saved[key], rtol=0, atol=0)  # exact: stored copies

    untied = config_of("v3_like", name, tie_word_embeddings=False)
    model, _ = build("deberta_fast", name, untied)
    model.save_pretrained(str(tmp_path / "untied"))
    _, info = getattr(deberta_fast, name).from_pretrained(str(tmp_path / "untied"), output_loading_info=True)
    assert not info["missing_keys"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_from_state_dict_and_mismatched_head_shapes(flavor, tmp_path):
    name = "DebertaV2ForSequenceClassification"
    model, _ = build(flavor, name, config_of("v3_like", name))
    if flavor == "deberta_fast":
        again = deberta_fast.DebertaV2ForSequenceClassification.from_pretrained(
            None, config=model.config, state_dict=model.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # exact: copies
    model.save_pretrained(str(tmp_path))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load(flavor, name, str(tmp_path), num_labels=5)
    bigger = load(flavor, name, str(tmp_path), num_labels=5, ignore_mismatched_sizes=True).eval()
    assert bigger.classifier.out_features == 5
    torch.testing.assert_close(bigger.deberta.encoder.layer[0].attention.self.query_proj.weight,
                               model.deberta.encoder.layer[0].attention.self.query_proj.weight, rtol=0, atol=0)
    with torch.no_grad():
        assert bigger(**inputs_for(name)).logits.shape == (BATCH, 5)


# ------------------------------------------------------------------------------------------------ training


def _train_step_matches_transformers(model, reference, inputs):
    """Training mode without dropout: loss and every gradient equal transformers'. When transformers' own model
    raises (its reentrant checkpointing cannot backpropagate twice into the shared, layer-normed relative
    embeddings), the same call raises here too: the behaviour is transformers'."""
    for net in (model, reference):
        net.train()
        for module in net.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    reference.zero_grad()
    try:
        expected = reference(**inputs).loss
        expected.backward()
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            model(**inputs).loss.backward()
        assert "backward through the graph a second time" in str(error)
        return False
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=TOL, atol=TOL)
    reference_grads = dict(reference.named_parameters())
    for key, param in model.named_parameters():
        theirs = reference_grads[key].grad
        assert (param.grad is None) == (theirs is None), key
        if theirs is not None:
            torch.testing.assert_close(param.grad, theirs, rtol=1e-4, atol=TOL, msg=key)
    return True


def _train_step_with_dropout(model, inputs):
    """As transformers' training test: dropout on, every parameter gets a gradient, an optimiser step applies."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    model.train()
    model.zero_grad()
    model(**inputs).loss.backward()
    missing = [key for key, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing, missing
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # a step changes bits


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step(variant, name, flavor):
    model, reference = build(flavor, name, config_of(variant, name))
    inputs = inputs_for(name, labels=True)
    assert _train_step_matches_transformers(model, reference, inputs)
    _train_step_with_dropout(model, inputs)


@pytest.mark.parametrize("checkpointing", [{}, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["default", "reentrant", "non_reentrant"])
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_with_gradient_checkpointing(variant, flavor, checkpointing):
    """Checkpointing wraps the encoder layers, whatever the head: one head class covers it."""
    name = "DebertaV2ForSequenceClassification"
    model, reference = build(flavor, name, config_of(variant, name))
    assert not model.is_gradient_checkpointing
    for net in (model, reference):
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    assert model.is_gradient_checkpointing
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)
    inputs = inputs_for(name, labels=True)
    if _train_step_matches_transformers(model, reference, inputs):
        _train_step_with_dropout(model, inputs)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert not any(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("problem, num_labels, dtype", [("multi_label_classification", 2, torch.float),
                                                         ("single_label_classification", 2, torch.long),
                                                         ("regression", 1, torch.float)])
def test_classification_problem_types(problem, num_labels, dtype, flavor):
    config = config_of("v3_like", problem_type=problem, num_labels=num_labels)
    model, reference = build(flavor, "DebertaV2ForSequenceClassification", config)
    inputs = inputs_for("DebertaV2ForSequenceClassification")
    generator = torch.Generator().manual_seed(4)
    if problem == "multi_label_classification":
        labels = torch.randint(0, 2, (BATCH, num_labels), generator=generator).to(dtype)
    elif problem == "regression":
        labels = torch.randn(BATCH, generator=generator)
    else:
        labels = torch.randint(0, num_labels, (BATCH,), generator=generator)
    with torch.no_grad():
        ours, theirs = model(**inputs, labels=labels), reference(**inputs, labels=labels)
    assert torch.isfinite(ours.loss)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------------------------ embeddings


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", ["v3_like"])
def test_resize_token_embeddings(variant, name, flavor):
    config = config_of(variant, name)
    model, _ = build(flavor, name, config)
    inputs = inputs_for(name)
    vocab = config.vocab_size
    kept = model.get_input_embeddings().weight.detach().clone()
    base = model.deberta if name != "DebertaV2Model" else model
    base_inputs = inputs_for("DebertaV2Model")
    with torch.no_grad():
        before = base(**base_inputs)
    grown = model.resize_token_embeddings(vocab + 10)
    # transformers resizes the module in place and keeps its class: deberta_fast's RowGradEmbedding stays one
    assert type(grown) is RowGradEmbedding and model.config.vocab_size == vocab + 10
    assert grown.weight.shape[0] == vocab + 10
    assert torch.equal(grown.weight[:vocab], kept)  # exact: resizing copies the old rows
    if name == "DebertaV2ForMaskedLM":
        assert model.get_output_embeddings().weight.shape[0] == vocab + 10
    with torch.no_grad():
        after = base(**base_inputs)
        model(**inputs)  # the head runs with the grown vocabulary
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=1e-6, atol=1e-6)
    shrunk = model.resize_token_embeddings(vocab - 15)
    assert shrunk.weight.shape[0] == vocab - 15 and model.config.vocab_size == vocab - 15
    clamped = dict(inputs, input_ids=inputs["input_ids"].clamp(max=vocab - 16))
    with torch.no_grad():
        model(**clamped)
    padded = model.resize_token_embeddings(vocab + 13, pad_to_multiple_of=64)
    assert padded.weight.shape[0] % 64 == 0 and padded.weight.shape[0] >= vocab + 13


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("tied", [True, False])
def test_resize_resizes_the_same_parameters_as_transformers(tied, flavor):
    """Masked LM, tied or untied word embeddings: after growing and shrinking the vocabulary every parameter has
    the shape transformers' model gets from the same calls, and the model still runs."""
    config = config_of("v3_like", tie_word_embeddings=tied)
    model, reference = build(flavor, "DebertaV2ForMaskedLM", config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    for size in (config.vocab_size + 10, config.vocab_size - 15):
        for net in (model, reference):
            net.resize_token_embeddings(size)
        shapes = {k: v.shape for k, v in reference.state_dict().items()}
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        assert model.get_output_embeddings().weight.shape[0] == size
        inputs = inputs_for("DebertaV2ForMaskedLM")
        inputs["input_ids"] = inputs["input_ids"].clamp(max=size - 1)
        with torch.no_grad():
            assert model(**inputs).logits.shape == (BATCH, LENGTH, size)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
def test_get_set_embeddings_main_input_name_and_meta_construction(name, flavor):
    config = config_of("v3_like", name)
    model, _ = build(flavor, name, config)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    replacement = torch.nn.Embedding(10, config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    output = model.get_output_embeddings()
    assert output is None or isinstance(output, torch.nn.Linear)
    cls = type(model)
    assert list(inspect.signature(cls.forward).parameters)[1] == cls.main_input_name == "input_ids"
    if flavor == "deberta_fast":
        with torch.device("meta"):
            on_meta = getattr(deberta_fast, name)(config)
        assert all(p.device.type == "meta" for p in on_meta.parameters())


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", ["tester", "v2_like"])
def test_inputs_embeds_match_input_ids(variant, name, flavor):
    model, _ = build(flavor, name, config_of(variant, name))
    inputs = inputs_for(name)
    input_ids = inputs.pop("input_ids")
    input_ids = torch.where(input_ids == model.config.pad_token_id, input_ids + 1, input_ids)
    with torch.no_grad():
        by_ids = model(input_ids=input_ids, **inputs)
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(input_ids), **inputs)
    assert_outputs_close(by_embeds, by_ids, tol=1e-6)


# ------------------------------------------------------------------------------------------------ [1, L] masks


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["DebertaV2Model", "DebertaV2ForSequenceClassification",
                                  "DebertaV2ForMultipleChoice"])
@pytest.mark.parametrize("variant", ["tester", "v2_like"])
def test_batch_one_mask_is_broadcast_over_the_batch(variant, name, flavor):
    """transformers broadcasts a [1, L] mask over the batch (one mask for every row); so does deberta_fast."""
    model, reference = build(flavor, name, config_of(variant, name))
    inputs = inputs_for(name)
    inputs.pop("attention_mask")
    row = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    rows = BATCH * CHOICES if name == "DebertaV2ForMultipleChoice" else BATCH
    full = row.expand(BATCH, CHOICES, -1) if name == "DebertaV2ForMultipleChoice" else row.expand(BATCH, -1)
    with torch.no_grad():
        ours = model(**inputs, attention_mask=row, output_attentions=True)
        theirs = reference(**inputs, attention_mask=row, output_attentions=True)
        expanded = model(**inputs, attention_mask=full.contiguous(), output_attentions=True)
    assert ours.attentions[0].shape[0] == rows
    assert_outputs_close(ours, theirs)
    assert_outputs_close(ours, expanded, tol=1e-6)


def test_batch_one_mask_reaches_the_fused_op_pair_masks_and_the_encoder():
    model, reference = build("deberta_fast", "DebertaV2Model", config_of("v3_like"))
    inputs = inputs_for("DebertaV2Model")
    inputs.pop("attention_mask")
    row = torch.tensor([[0, 1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, attention_mask=row).last_hidden_state,
                                   reference(**inputs, attention_mask=row).last_hidden_state, rtol=TOL, atol=TOL)
        pairs = (row[:, :, None] * row[:, None, :]).float()
        torch.testing.assert_close(model(**inputs, attention_mask=pairs).last_hidden_state,
                                   model(**inputs, attention_mask=pairs.expand(BATCH, -1, -1)).last_hidden_state,
                                   rtol=1e-6, atol=1e-6)
        hidden = torch.randn(BATCH, LENGTH, TESTER["hidden_size"], generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model.encoder(hidden, row).last_hidden_state,
                                   reference.encoder(hidden, row).last_hidden_state, rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(**inputs, attention_mask=torch.ones(2, LENGTH))


def test_batch_one_mask_in_the_adapter_model():
    model = deberta_fast.DebertaV2AdapterModel(config_of("v3_like"))
    model.add_adapter("a", config="seq_bn")
    model.set_active_adapters("a")
    model.eval()
    inputs = inputs_for("DebertaV2Model")
    inputs.pop("attention_mask")
    row = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        broadcast = model(**inputs, attention_mask=row).last_hidden_state
        expanded = model(**inputs, attention_mask=row.expand(BATCH, -1).contiguous()).last_hidden_state
    torch.testing.assert_close(broadcast, expanded, rtol=1e-6, atol=1e-6)
