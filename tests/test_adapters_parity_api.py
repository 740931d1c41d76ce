"""AdapterHub 1.3.0 API behaviours: the embeddings API, adapter setups on disk, the adapter API on
``model.base_model``, loading_info, exception types, custom heads, ``init(model)`` on transformers' static-head
models, ``init_adapters`` / ``forward_context`` / ``head_type``, ``init_weights_seed`` for every method."""

from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch
import torch.nn as nn
from transformers import (
    DebertaV2ForMaskedLM,
    DebertaV2ForMultipleChoice,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
    DebertaV2Model,
    PreTrainedTokenizerFast,
)

from adapters_helpers import randomize_adapter_, tiny_inputs, tiny_model
from configs import make_config, perturb_
from deberta_fast import DebertaV2AdapterModel
from deberta_fast.adapters.init import AdapterInitMixin
from deberta_fast.adapters import (
    AdapterSetup,
    ClassificationHead,
    ForwardContext,
    Fuse,
    MultiTask,
    PredictionHead,
    Stack,
    head_type,
    init,
)


def _tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


# ---- embeddings -------------------------------------------------------------------------------------------------


def test_add_switch_and_delete_embeddings():
    model = tiny_model()
    inputs = tiny_inputs()
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
    assert model.active_embeddings == "default"
    tokenizer = _tokenizer([f"w{i}" for i in range(120)])
    model.add_embeddings("new", tokenizer)
    assert model.active_embeddings == "new"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 122
    assert model.config.vocab_size == 122
    assert not model.get_input_embeddings().weight.requires_grad
    with torch.no_grad():
        switched = model(**inputs).last_hidden_state
    assert float((switched - base).abs().max()) > 1e-3
    model.set_active_embeddings("default")
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, base)  # the same module, the same computation
    model.set_active_embeddings("new")
    model.delete_embeddings("new")
    assert model.active_embeddings == "default" and "new" not in model.loaded_embeddings
    with pytest.raises(ValueError, match="already exists"):
        model.add_embeddings("default", tokenizer)
    with pytest.raises(ValueError, match="No embedding"):
        model.delete_embeddings("new")
    with pytest.raises(KeyError):
        model.add_embeddings("x", tokenizer, reference_embedding="default")


def test_embeddings_from_a_reference_share_rows_of_common_tokens():
    model = tiny_model()
    reference_tokenizer = _tokenizer(["a", "b", "c", "d"])
    new_tokenizer = _tokenizer(["d", "x", "b", "y"])
    model.add_embeddings("new", new_tokenizer, "default", reference_tokenizer)
    default = model.base_model.loaded_embeddings["default"].weight
    new = model.loaded_embeddings["new"].weight
    old_vocab, new_vocab = reference_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    for token in ("b", "d", "[UNK]", "[PAD]"):
        assert torch.equal(new[new_vocab[token]], default[old_vocab[token]]), token
    assert not torch.equal(new[new_vocab["x"]], default[old_vocab["a"]])


def test_save_and_load_embeddings_with_tokenizer(tmp_path):
    model = tiny_model()
    tokenizer = _tokenizer(["p", "q", "r"])
    model.add_embeddings("e", tokenizer)
    inputs = {"input_ids": torch.tensor([[2, 3, 4, 0]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        first = model(**inputs).last_hidden_state
    model.save_embeddings(str(tmp_path), "e", tokenizer=tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["embedding.pt", "tokenizer"]
    loaded_tokenizer = model.load_embeddings(str(tmp_path), "e2")
    assert model.active_embeddings == "e2"
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(model.loaded_embeddings["e"].weight, model.loaded_embeddings["e2"].weight)
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, first)
    with pytest.raises(FileNotFoundError):
        model.load_embeddings(str(tmp_path / "missing"), "e3")


def test_train_embeddings_unfreezes_the_active_embedding():
    model = tiny_model()
    model.add_embeddings("e", _tokenizer(["p", "q"]))
    model.add_adapter("a")
    model.train_adapter("a", train_embeddings=True)
    assert model.get_input_embeddings().weight.requires_grad


# ---- adapter setups ---------------------------------------------------------------------------------------------


def test_save_and_load_adapter_setup(tmp_path):
    model = tiny_model()
    for name in ("a", "b"):
        model.add_adapter(name, config="seq_bn")
        randomize_adapter_(model, name, seed=len(name) + ord(name))
    model.add_adapter("c", config="lora[r=2]")
    randomize_adapter_(model, "c", seed=3)
    model.add_adapter_fusion(Fuse("a", "b"))
    randomize_adapter_(model, "a,b", seed=4)
    model.add_classification_head("head", num_labels=3)
    setup = Stack(Fuse("a", "b"), "c")
    model.set_active_adapters(setup)
    model.active_head = "head"
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_adapter_setup(str(tmp_path), setup, head_setup="head")
    with open(tmp_path / "adapter_setup.json", encoding="utf-8") as handle:
        written = json.load(handle)
    assert written["adapter_setup"]["type"] == "Stack" and written["head_setup"] == "head"
    assert {"a", "b", "c", "a,b", "head"} <= set(os.listdir(tmp_path))

    other = tiny_model()
    loaded_setup, head_setup = other.load_adapter_setup(str(tmp_path), set_active=True)
    assert loaded_setup == setup and head_setup == "head"
    assert other.active_adapters == setup and other.active_head == "head"
    with torch.no_grad():
        assert torch.allclose(other(**inputs).logits, expected, atol=1e-6)


# ---- the adapter API on model.base_model ------------------------------------------------------------------------


def test_base_model_carries_the_adapter_api(tmp_path):
    model = tiny_model()
    base = model.base_model
    assert base is model.deberta
    assert base.supports_adapter("lora") and base.support_lora_delta_w_svd is False
    base.add_adapter("x", config="seq_bn")
    assert "x" in model.adapters_config and base.adapters_config is model.adapters_config
    base.set_active_adapters("x")
    assert model.active_adapters == Stack("x") and base.active_adapters == Stack("x")
    base.add_adapter("y", config="seq_bn")
    base.add_adapter_fusion(Fuse("x", "y"))
    assert base.get_fusion_regularization_loss() is not None
    model.add_classification_head("x")
    base.save_adapter(str(tmp_path / "x"), "x")
    assert "head_config.json" not in os.listdir(tmp_path / "x")  # AdapterHub's base model has no heads
    fresh = tiny_model()
    assert fresh.base_model.load_adapter(str(tmp_path / "x")) == "x"
    assert "x" in fresh.adapters_config and "x" not in fresh.heads
    assert base.loaded_embeddings["default"] is model.get_input_embeddings()


def test_base_model_api_follows_copies():
    model = tiny_model()
    twin = copy.deepcopy(model)
    twin.base_model.add_adapter("only_in_twin")
    assert "only_in_twin" in twin.adapters_config and "only_in_twin" not in model.adapters_config


# ---- loading info, exceptions, deletion -------------------------------------------------------------------------


def test_loading_info_from_load_head_and_from_pretrained(tmp_path):
    model = tiny_model()
    model.add_adapter("a", config="prefix_tuning[prefix_length=3]")
    model.add_tagging_head("a", num_labels=4)
    model.save_head(str(tmp_path / "head"), "a")
    info = {}
    assert tiny_model().load_head(str(tmp_path / "head"), load_as="t", loading_info=info) == "t"
    assert info == {"missing_keys": [], "unexpected_keys": []}
    model.save_pretrained(str(tmp_path / "full"))
    loaded, info = DebertaV2AdapterModel.from_pretrained(str(tmp_path / "full"), output_loading_info=True)
    assert isinstance(loaded, DebertaV2AdapterModel) and "a" in loaded.adapters_config
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_exception_types_match_adapterhub():
    model = tiny_model()
    with pytest.raises(TypeError, match="unknown config key"):
        model.add_adapter("a", config="lora[rank=3]")
    with pytest.raises(KeyError, match="no 'default'"):
        model.add_adapter("b", config="seq_bn[reduction_factor={'1': 4}]")
    assert "a" not in model.adapters_config and "b" not in model.adapters_config
    with pytest.raises(AttributeError, match="not registered"):
        model.add_custom_head("never_registered", "h")


def test_deleting_unknown_names_is_a_no_op():
    model = tiny_model()
    model.add_adapter("a")
    model.add_classification_head("a")
    model.delete_adapter("missing")
    model.delete_head("missing")
    assert "a" in model.adapters_config and "a" in model.heads


# ---- custom heads -----------------------------------------------------------------------------------------------


class _MeanPoolHead(PredictionHead):
    """A custom head written against AdapterHub's API: (model, head_name, **config), build(model)."""

    def __init__(self, model, head_name, num_labels=3, layers=2, activation_function="relu"):
        super().__init__(head_name)
        self.config = {"num_labels": num_labels, "layers": layers, "activation_function": activation_function}
        self.build(model)

    def forward(self, outputs, cls_output=None, attention_mask=None, return_dict=False, **kwargs):
        pooled = outputs[0].mean(dim=1)
        for module in self:
            pooled = module(pooled)
        return (pooled,)


def test_custom_head_with_adapterhub_signatures():
    model = tiny_model()
    model.register_custom_head("mean_pool", _MeanPoolHead)
    model.add_custom_head(head_type="mean_pool", head_name="m", num_labels=5)
    head = model.heads["m"]
    assert head.config["head_type"] == "mean_pool"
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "Activation", "Dropout", "Linear"]
    assert head[4].out_features == 5 and not head.training  # training mode copied from the model (eval)
    with torch.no_grad():
        out = model(**tiny_inputs(), head="m")
        hidden = model.base_model(**tiny_inputs()).last_hidden_state
    assert out[0].shape == (2, 5)
    assert torch.allclose(out[0], head[4](torch.relu(head[1](hidden.mean(1)))), atol=1e-6)


def test_builtin_head_class_registered_as_custom_head():
    model = tiny_model()
    model.register_custom_head("my_classification", ClassificationHead)
    model.add_custom_head("my_classification", "c", num_labels=4, layers=1)
    assert model.heads["c"][1].out_features == 4 and model.heads["c"].config["head_type"] == "classification"


def test_head_type_decorator():
    class Model:
        head_types = ["classification"]
        config = make_config("v3")

        @head_type("classification")
        def ok(self):
            return "added"

        @head_type("causal_lm")
        def refused(self):
            return "added"

    assert Model().ok() == "added"
    with pytest.raises(ValueError, match="does not support head type 'causal_lm'"):
        Model().refused()


# ---- init(model) on transformers' static-head models ------------------------------------------------------------

STATIC_CLASSES = {
    "sequence_classification": (DebertaV2ForSequenceClassification, {"labels": torch.tensor([0, 2])}, {}),
    "token_classification": (DebertaV2ForTokenClassification, {"labels": torch.zeros(2, 9, dtype=torch.long)}, {}),
    "question_answering": (DebertaV2ForQuestionAnswering, {"start_positions": torch.tensor([1, 2]),
                                                          "end_positions": torch.tensor([3, 4])}, {}),
    "multiple_choice": (DebertaV2ForMultipleChoice, {"labels": torch.tensor([1])}, {"choices": 2}),
    "masked_lm": (DebertaV2ForMaskedLM, {"labels": torch.ones(2, 9, dtype=torch.long)}, {}),
}


def _static_model(cls, seed=0):
    torch.manual_seed(seed)
    # question answering has 2 outputs (start, end); multiple choice converts with num_choices = num_labels
    labels = 2 if cls in (DebertaV2ForQuestionAnswering, DebertaV2ForMultipleChoice) else 3
    model = cls(make_config("v3", num_labels=labels, pooler_hidden_act="gelu"))
    perturb_(model, seed=seed + 1)
    return model.eval()


def _inputs_for(kind):
    # no padding: transformers' token-classification loss counts padded tokens, the flexible tagging head (as
    # AdapterHub's) does not
    inputs = tiny_inputs()
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    if STATIC_CLASSES[kind][2].get("choices"):
        inputs = {k: v.reshape(1, 2, -1) for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("kind", sorted(STATIC_CLASSES))
def test_init_static_head_model_converts_heads_both_ways(tmp_path, kind):
    cls, labels, _ = STATIC_CLASSES[kind]
    static = _static_model(cls)
    inputs = _inputs_for(kind)
    with torch.no_grad():
        reference = static(**inputs, **labels)
    assert init(static) is static
    assert isinstance(static, cls) and type(static).__name__ == cls.__name__
    with torch.no_grad():
        same = static(**inputs, **labels)
    assert torch.allclose(same.loss, reference.loss, atol=1e-6)
    # static -> flex
    static.save_head(str(tmp_path / "static"))
    flex = DebertaV2AdapterModel(copy.deepcopy(static.config))
    flex.load_state_dict(static.state_dict(), strict=False)
    flex.eval()
    info = {}
    flex.load_head(str(tmp_path / "static"), load_as="test", loading_info=info)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        converted = flex(**inputs, **labels, head="test")
    assert torch.allclose(converted.loss, reference.loss, atol=1e-5)
    assert torch.allclose(converted[1], reference[1], atol=1e-5)
    # flex -> static: a flexible head of the same type and size replaces the static head's weights
    flex_source = DebertaV2AdapterModel(copy.deepcopy(static.config))
    flex_source.load_state_dict(static.state_dict(), strict=False)
    flex_source.load_head(str(tmp_path / "static"), load_as="back")
    with torch.no_grad():
        for name, param in flex_source.heads["back"].named_parameters():
            if param is not flex_source.get_input_embeddings().weight:
                param.add_(0.1)
        expected = flex_source.eval()(**inputs, **labels, head="back")
    flex_source.save_head(str(tmp_path / "flex"), "back")
    static.load_head(str(tmp_path / "flex"))
    with torch.no_grad():
        back = static(**inputs, **labels)
    assert torch.allclose(back[1], expected[1], atol=1e-5)


def test_init_adds_the_adapter_api_to_a_static_model(tmp_path):
    static = _static_model(DebertaV2ForSequenceClassification)
    other = _static_model(DebertaV2ForSequenceClassification)
    init(static)
    assert type(other).__name__ == "DebertaV2ForSequenceClassification"
    assert not hasattr(other, "train_adapter_fusion") and hasattr(static, "train_adapter_fusion")
    inputs = tiny_inputs()
    static.add_adapter("a", config="lora[r=4, attn_matrices=['q','k','v']]")
    randomize_adapter_(static, "a", seed=2)
    static.train_adapter("a")
    trainable = {n for n, p in static.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("deberta.")} == {
        "pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert all(".loras.a." in n for n in trainable if n.startswith("deberta."))
    static.eval()
    with torch.no_grad():
        with_adapter = static(**inputs).logits
    static.save_adapter(str(tmp_path / "a"), "a")
    assert {"adapter_config.json", "pytorch_adapter.bin", "head_config.json"} <= set(os.listdir(tmp_path / "a"))
    flex = DebertaV2AdapterModel(copy.deepcopy(static.config))
    flex.load_state_dict({k: v for k, v in static.state_dict().items() if ".loras." not in k}, strict=False)
    flex.load_adapter(str(tmp_path / "a"), set_active=True)
    with torch.no_grad():
        assert torch.allclose(flex.eval()(**inputs, head="a").logits, with_adapter, atol=1e-5)


def test_init_on_a_bare_base_model():
    torch.manual_seed(0)
    model = DebertaV2Model(make_config("v3")).eval()
    init(model)
    model.add_adapter("a", config="seq_bn")
    randomize_adapter_(model, "a", seed=1)
    assert model.base_model is model and set(model.get_adapter("a")) == {0, 1}
    inputs = tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        model.set_active_adapters("a")
        adapted = model(**inputs).last_hidden_state
    assert float((adapted - plain).abs().max()) > 1e-3


def test_init_refuses_other_models():
    with pytest.raises(TypeError, match="DeBERTa-v2"):
        init(nn.Linear(2, 2))


# ---- init_adapters, forward_context -----------------------------------------------------------------------------


def test_init_adapters_builds_from_a_config_dict():
    source = tiny_model()
    source.add_adapter("a", config="lora[r=2]")
    source.add_adapter("b", config="seq_bn")
    source.add_adapter("c", config="seq_bn")
    source.add_adapter_fusion(Fuse("b", "c"))
    target = tiny_model()
    pool = target.base_model.prefix_tuning
    target.init_adapters(target.config, source.adapters_config.to_dict(), add_prefix_tuning_pool=False)
    assert set(target.adapters_config) == {"a", "b", "c"}
    assert target.base_model.prefix_tuning is pool  # shared, not replaced
    assert "a" in target.deberta.encoder.layer[0].attention.self.query_proj.loras
    assert "b,c" in target.deberta.encoder.layer[1].output.adapter_fusion_layer


def test_init_adapters_without_a_pool_to_share():
    class NoPool(AdapterInitMixin):
        base_model = types.SimpleNamespace()

    with pytest.raises(ValueError, match="prefix-tuning pool"):
        NoPool().init_adapters(None, None, add_prefix_tuning_pool=False)


def test_forward_context_fills_task_ids_and_shared_parameters():
    model = tiny_model()
    model.add_adapter("c", config="compacter[reduction_factor=4]")
    model.set_active_adapters("c")
    context = ForwardContext(registry=model.adapters_config, adapter_setup=None)
    ids = torch.tensor([0, 1])
    model.forward_context(context, task_ids=ids)
    assert context.task_ids is ids
    assert set(context.shared_parameters) == {"c"}
    assert context.shared_parameters["c"] is model.deberta.shared_parameters["c"]
    with AdapterSetup(None):
        empty = ForwardContext(registry=model.adapters_config, adapter_setup=None)
        model.set_active_adapters(None)
        model.forward_context(empty)
    assert not hasattr(empty, "shared_parameters")


# ---- init_weights_seed ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["compacter[reduction_factor=4, init_weights_seed=11]",
                                    "compacter++[reduction_factor=4, init_weights_seed=11, shared_W_phm=True]",
                                    "loreft[init_weights_seed=11]", "noreft[init_weights_seed=11, r=2]",
                                    "seq_bn_inv[init_weights_seed=11]"])
def test_init_weights_seed_gives_equal_weights(config):
    first, second = tiny_model(), tiny_model(seed=4)
    first.add_adapter("a", config=config)
    torch.manual_seed(123)  # the global stream must not matter
    second.add_adapter("a", config=config)
    second.add_adapter("b", config=config)
    params_1, params_2 = dict(first.named_parameters()), dict(second.named_parameters())
    keys = [k for k in params_1 if ".a." in k and (".adapters." in k or ".refts." in k or ".shared_parameters."
                                                     in k or ".invertible_adapters." in k)]
    assert keys
    for key in keys:
        assert torch.equal(params_1[key], params_2[key]), key  # same seed, same generator, same draws
        assert torch.equal(params_2[key], params_2[key.replace(".a.", ".b.")]), key
    unseeded = tiny_model()
    unseeded.add_adapter("a", config=config.replace("init_weights_seed=11", "init_weights_seed=12"))
    different = [k for k in keys if "bias" not in k and not torch.equal(params_1[k],
                                                                       dict(unseeded.named_parameters())[k])]
    assert different


# ---- prefix tuning under MultiTask ------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [(3, 3), (3, 5)])
def test_prefix_tuning_multitask_routes_rows_to_their_task(lengths):
    model = tiny_model()
    for name, length in zip(("p", "q"), lengths):
        model.add_adapter(name, config=f"prefix_tuning[prefix_length={length}]")
        randomize_adapter_(model, name, seed=ord(name))
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 97, (4, 8), generator=generator),
              "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    inputs["attention_mask"][2, 6:] = 0
    tasks = [1, 0, 0, 1]
    model.set_active_adapters(MultiTask("p", "q"))
    with torch.no_grad():
        routed = model(**inputs, task_ids=tasks).last_hidden_state
        named = model(**inputs, task_ids=["q", "p", "p", "q"]).last_hidden_state
        assert torch.equal(routed, named)
        for row, task in enumerate(tasks):
            alone = {k: v[row:row + 1] for k, v in inputs.items()}
            model.set_active_adapters(["p", "q"][task])
            own = model(**alone).last_hidden_state[0]
            model.set_active_adapters(["p", "q"][1 - task])
            other = model(**alone).last_hidden_state[0]
            assert torch.allclose(routed[row], own, atol=1e-5), row
            assert float((routed[row] - other).abs().max()) > 1e-3, row


def test_static_model_save_pretrained_loads_as_adapter_model(tmp_path):
    static = _static_model(DebertaV2ForSequenceClassification)
    init(static)
    static.add_adapter("a", config="lora[r=2, attn_matrices=['q','v']]")
    randomize_adapter_(static, "a", seed=9)
    static.set_active_adapters("a")
    static.save_pretrained(str(tmp_path))
    assert not hasattr(static.config, "adapters")  # written to config.json only
    flex, info = DebertaV2AdapterModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "a" in flex.adapters_config and "default" in flex.heads
    inputs = tiny_inputs()
    with torch.no_grad(), AdapterSetup("a"):
        expected = static(**inputs).logits
        converted = flex.eval()(**inputs, head="default").logits
    assert torch.allclose(converted, expected, atol=1e-5)
