"""Flexible heads: layouts and keys, losses and output classes, activation, label maps, static -> flex."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from adapters_helpers import tiny_inputs, tiny_model
from configs import make_config, perturb_
from deberta_fast import DebertaV2AdapterModel
from deberta_fast.adapters import MultiHeadOutput

TOL = 1e-5


def _head_keys(model, name):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(f"heads.{name}.")}


def test_head_layouts_and_keys():
    model = tiny_model("v3")
    h, v = model.config.hidden_size, model.config.vocab_size
    model.add_classification_head("c", num_labels=3)
    model.add_classification_head("ml", num_labels=4, multilabel=True)
    model.add_multiple_choice_head("mc", num_choices=2)
    model.add_tagging_head("t", num_labels=5)
    model.add_qa_head("qa")
    model.add_masked_lm_head("mlm")
    model.add_classification_head("lin", layers=1, activation_function=None)
    assert _head_keys(model, "c") == {"heads.c.1.weight": (h, h), "heads.c.1.bias": (h,), "heads.c.4.weight": (3, h),
                                      "heads.c.4.bias": (3,)}
    assert _head_keys(model, "mc")["heads.mc.4.weight"] == (1, h)
    assert _head_keys(model, "t") == {"heads.t.1.weight": (5, h), "heads.t.1.bias": (5,)}
    assert _head_keys(model, "qa") == {"heads.qa.1.weight": (2, h), "heads.qa.1.bias": (2,)}
    assert _head_keys(model, "mlm") == {"heads.mlm.0.weight": (h, h), "heads.mlm.0.bias": (h,),
                                        "heads.mlm.2.weight": (h,), "heads.mlm.2.bias": (h,),
                                        "heads.mlm.3.weight": (v, h), "heads.mlm.3.bias": (v,)}
    assert _head_keys(model, "lin") == {"heads.lin.1.weight": (2, h), "heads.lin.1.bias": (2,)}
    assert [type(m).__name__ for m in model.heads["c"]] == ["Dropout", "Linear", "Activation", "Dropout", "Linear"]
    assert model.heads["mlm"][2].eps == model.config.layer_norm_eps
    assert model.heads["mlm"][3].weight.data_ptr() == model.deberta.embeddings.word_embeddings.weight.data_ptr()
    assert model.heads["c"].config == {"head_type": "classification", "num_labels": 3, "layers": 2,
                                       "activation_function": "tanh", "label2id": {f"LABEL_{i}": i for i in range(3)},
                                       "use_pooler": False, "bias": True, "dropout_prob": None}
    assert model.active_head == "lin"


def _manual_head(head, x):
    for module in head:
        x = module(x)
    return x


def test_head_outputs_and_losses():
    model = tiny_model("v3")
    inputs = tiny_inputs(batch=4, length=7)
    model.add_classification_head("c", num_labels=3)
    model.add_classification_head("r", num_labels=1)
    model.add_classification_head("ml", num_labels=4, multilabel=True)
    model.add_tagging_head("t", num_labels=5)
    model.add_qa_head("qa")
    model.add_masked_lm_head("mlm")
    model.add_multiple_choice_head("mc", num_choices=2)
    with torch.no_grad():
        base = model.deberta(**inputs).last_hidden_state
        cls = base[:, 0]

        labels = torch.tensor([0, 2, 1, 2])
        out = model(**inputs, head="c", labels=labels)
        logits = _manual_head(model.heads["c"], cls)
        assert isinstance(out, SequenceClassifierOutput) and out.logits.shape == (4, 3)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=TOL)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels), rtol=0, atol=TOL)

        target = torch.randn(4)
        out = model(**inputs, head="r", labels=target)
        torch.testing.assert_close(out.loss, F.mse_loss(_manual_head(model.heads["r"], cls).view(-1), target))

        multi = torch.randint(0, 2, (4, 4))
        out = model(**inputs, head="ml", labels=multi)
        torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(
            _manual_head(model.heads["ml"], cls), multi.float()), rtol=0, atol=TOL)

        tags = torch.randint(0, 5, (4, 7))
        out = model(**inputs, head="t", labels=tags)
        logits = _manual_head(model.heads["t"], base)
        active = inputs["attention_mask"].view(-1) == 1
        assert isinstance(out, TokenClassifierOutput) and out.logits.shape == (4, 7, 5)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits.view(-1, 5)[active], tags.view(-1)[active]),
                                   rtol=0, atol=TOL)

        start, end = torch.tensor([1, 3, 99, 0]), torch.tensor([2, 4, 5, 7])
        out = model(**inputs, head="qa", start_positions=start, end_positions=end)
        s, e = _manual_head(model.heads["qa"], base).unbind(-1)
        expected = (F.cross_entropy(s, start.clamp(0, 7), ignore_index=7)
                    + F.cross_entropy(e, end.clamp(0, 7), ignore_index=7)) / 2
        assert isinstance(out, QuestionAnsweringModelOutput) and out.start_logits.shape == (4, 7)
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=TOL)
        assert start.tolist() == [1, 3, 99, 0]  # user tensors are not clamped in place

        mlm_labels = torch.full((4, 7), -100)
        mlm_labels[:, 2] = 5
        out = model(**inputs, head="mlm", labels=mlm_labels)
        logits = _manual_head(model.heads["mlm"], base)
        assert isinstance(out, MaskedLMOutput)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=TOL)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits.view(-1, logits.shape[-1]), mlm_labels.view(-1)))

        choices = {k: v.view(2, 2, 7) for k, v in inputs.items()}
        out = model(**choices, head="mc", labels=torch.tensor([1, 0]))
        logits = _manual_head(model.heads["mc"], cls).view(2, 2)
        assert isinstance(out, MultipleChoiceModelOutput) and out.logits.shape == (2, 2)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=TOL)

        as_tuple = model(**inputs, head="c", labels=labels, return_dict=False)
        torch.testing.assert_close(as_tuple[1], model(**inputs, head="c").logits)

        model.active_head = ["c", "t"]
        multi_out = model(**inputs)
        assert isinstance(multi_out, MultiHeadOutput) and len(multi_out) == 2
        assert multi_out[1].logits.shape == (4, 7, 5)
        model.active_head = None
        assert isinstance(model(**inputs), BaseModelOutput)


def test_use_pooler_gives_per_sequence_logits():
    model = tiny_model("v3")
    model.add_classification_head("p", num_labels=2, use_pooler=True)
    inputs = tiny_inputs()
    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape == (2, 2)
        cls = model.deberta(**inputs).last_hidden_state[:, 0]
        torch.testing.assert_close(out.logits, _manual_head(model.heads["p"], cls), rtol=0, atol=TOL)


def test_head_configs_do_not_leak_between_models_of_one_config():
    config = make_config("v3")
    first = DebertaV2AdapterModel(config)
    first.add_classification_head("a")
    first.add_adapter("x")
    second = DebertaV2AdapterModel(config)
    assert len(second.heads) == 0 and not second.has_adapters()
    second.add_classification_head("a")  # no "already contains a head" error
    assert not hasattr(config, "prediction_heads") and not hasattr(config, "adapters")


def test_labels_and_active_head():
    model = tiny_model("v3")
    model.add_classification_head("c", num_labels=2, id2label={0: "neg", 1: "pos"})
    model.add_tagging_head("t", num_labels=3)
    model.add_masked_lm_head("m", overwrite_ok=False)
    assert model.get_labels_dict("c") == {0: "neg", 1: "pos"} and model.get_labels("c") == ["neg", "pos"]
    assert model.get_labels("t") == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert model.get_labels("m") is None
    model.active_head = "c"
    assert model.get_labels() == ["neg", "pos"]
    model.add_adapter("t")
    model.set_active_adapters("t")
    assert model.active_head == "t"
    model.delete_head("t")
    assert model.active_head is None and "t" not in model.heads
    model.delete_head("t")
    assert model.get_prediction_heads_config()["c"]["label2id"] == {"neg": 0, "pos": 1}


def test_average_head():
    model = tiny_model("v3")
    model.add_classification_head("a")
    model.add_classification_head("b")
    model.average_head("avg", ["a", "b"], weights=[1, 3])
    torch.testing.assert_close(model.heads["avg"][4].weight,
                               0.25 * model.heads["a"][4].weight + 0.75 * model.heads["b"][4].weight)


@pytest.mark.parametrize("architecture,extra", [
    ("DebertaV2ForSequenceClassification", {"num_labels": 3, "pooler_hidden_act": "tanh"}),
    ("DebertaV2ForMultipleChoice", {}),
    ("DebertaV2ForTokenClassification", {"num_labels": 4}),
    ("DebertaV2ForQuestionAnswering", {}),
    ("DebertaV2ForMaskedLM", {}),
    ("DebertaV2ForMaskedLM", {"legacy": False}),
])
def test_static_checkpoint_head_becomes_flex_head_default(architecture, extra, tmp_path):
    torch.manual_seed(0)
    reference = perturb_(getattr(hf, architecture)(make_config("v3", **extra))).eval()
    reference.save_pretrained(str(tmp_path / "static"))
    model = DebertaV2AdapterModel.from_pretrained(str(tmp_path / "static")).eval()
    assert model.active_head == "default" and list(model.heads) == ["default"]
    inputs = tiny_inputs()
    if architecture == "DebertaV2ForMultipleChoice":
        inputs = {k: v.view(1, 2, -1) for k, v in inputs.items()}
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    key = "start_logits" if "QuestionAnswering" in architecture else "logits"
    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL)
    if "pooler_hidden_act" in extra:
        assert model.heads["default"].config["activation_function"] == "tanh"
    model.save_pretrained(str(tmp_path / "flex"))
    again = DebertaV2AdapterModel.from_pretrained(str(tmp_path / "flex")).eval()
    with torch.no_grad():
        # reloaded weights are fresh allocations: GEMM may take another path, so rounding-level tolerance
        torch.testing.assert_close(again(**inputs)[key], ours[key], rtol=1e-6, atol=1e-6)


def test_unsupported_head_types_raise():
    model = tiny_model("v3")
    for method in (model.add_causal_lm_head, model.add_seq2seq_lm_head, model.add_dependency_parsing_head,
                   model.add_image_classification_head):
        with pytest.raises(ValueError, match="does not support head type"):
            method("x")
    with pytest.raises(ValueError, match="does not support head type 'causal_lm'"):
        model.add_prediction_head_from_config("x", {"head_type": "causal_lm"})
    assert len(model.heads) == 0


def test_forward_head_output_embeddings_and_tie_weights():
    model = tiny_model("v3")
    model.add_adapter("m", config="seq_bn")
    model.add_masked_lm_head("m")
    model.add_classification_head("c")
    inputs = tiny_inputs()
    with torch.no_grad():
        base = model.deberta(**inputs)
        direct = model.forward_head(base, head_name="c", attention_mask=inputs["attention_mask"], return_dict=True)
        # exact: the same modules run the same kernels on the same tensors in both calls
        torch.testing.assert_close(direct.logits, model(**inputs, head="c").logits, rtol=0, atol=0)
    model.active_head = "m"
    assert model.get_output_embeddings() is model.heads["m"][3]
    model.active_head = "c"
    assert model.get_output_embeddings() is None
    new_embeddings = torch.nn.Embedding(model.config.vocab_size, model.config.hidden_size)
    model.set_input_embeddings(new_embeddings)
    assert model.heads["m"][3].weight is new_embeddings.weight
    model.heads["m"][3].weight = torch.nn.Parameter(torch.zeros_like(new_embeddings.weight))
    model.tie_weights()
    assert model.heads["m"][3].weight is new_embeddings.weight
