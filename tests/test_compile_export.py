"""torch.compile(fullgraph=True) and torch.export without graph breaks (issue 12, items 2 and 6).

Every model class and the adapter model (one LoRA, one bottleneck adapter) compile into a single graph on the CPU,
with the native op and with the reference backend, in eval and train mode, and reproduce eager mode; the
``use_backend`` choice is guarded (changing it recompiles); ``torch.export`` with dynamic batch and length
reproduces the model at other shapes.

Most compiles use the ``aot_eager`` backend: dynamo with ``fullgraph=True`` (where graph breaks would raise) and
AOT autograd (forward and backward graphs, the custom ops' fake and autograd rules), without Inductor's code
generation, which costs tens of seconds per graph on a 2-core machine. Two tests run the default Inductor backend.
With ``aot_eager`` the random ops run as in eager mode, in the same order, so train mode with dropout on is compared
with eager mode under the same seed.
"""

from __future__ import annotations

import pytest
import torch
from configs import make_config, perturb_

import deberta_fast
from deberta_fast.ops import dispatch, use_backend

CLASSES = {
    "model": deberta_fast.DebertaV2Model,
    "sequence_classification": deberta_fast.DebertaV2ForSequenceClassification,
    "masked_lm": deberta_fast.DebertaV2ForMaskedLM,
    "token_classification": deberta_fast.DebertaV2ForTokenClassification,
    "question_answering": deberta_fast.DebertaV2ForQuestionAnswering,
    "multiple_choice": deberta_fast.DebertaV2ForMultipleChoice,
}
NATIVE_OP = "deberta_fast_cpu.disentangled_attention_forward"
TRITON_OP = "deberta_fast.disentangled_attention_fwd"
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A torch.compile backend that keeps every dynamo graph, then runs it with aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    def count(self, op_name: str, graph: int = -1) -> int:
        return sum(1 for node in self.graphs[graph].graph.nodes
                   if node.op == "call_function" and op_name in str(node.target))


def _model(key, config_name="v3", seed=0, **overrides):
    torch.manual_seed(seed)
    config = make_config(config_name, num_labels=2, **overrides)  # QA splits 2 logits
    return perturb_(CLASSES[key](config), seed=seed + 1).eval()


def _inputs(key, batch=2, length=10, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    if key == "multiple_choice":  # [B, C, L]
        ids, mask = torch.stack([ids, ids.flip(-1)], 1), torch.stack([mask, mask], 1)
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(out):
    """The tensors of a model output, by name (logits, start/end logits, last hidden state)."""
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_close(got, expected, tolerance=TOLERANCE):
    assert got.keys() == expected.keys()
    for name in expected:
        error = (got[name] - expected[name]).abs().max().item()
        assert error <= tolerance, f"{name}: max error {error}"


# ---------------------------------------------------------------------------------------------- eval, every class


@pytest.mark.parametrize("key", list(CLASSES))
def test_every_model_class_compiles_fullgraph_on_the_native_op(key):
    model = _model(key, num_hidden_layers=1)
    inputs = _inputs(key)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("cpu"), torch.no_grad():
        expected = _outputs(model(**inputs))
        got = _outputs(compiled(**inputs))
    _assert_close(got, expected)
    assert len(recorder.graphs) == 1
    assert recorder.count(NATIVE_OP) == 1  # one layer, one native attention op in the graph


@pytest.mark.parametrize("key,config_name", [("model", "v2_xlarge"), ("question_answering", "small_buckets")])
def test_model_classes_compile_fullgraph_on_the_reference(key, config_name):
    """Reference backend: no custom op in the graph; the slot window and table are graph constants."""
    model = _model(key, config_name)
    inputs = _inputs(key, length=13)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("reference"), torch.no_grad():
        expected = _outputs(model(**inputs))
        got = _outputs(compiled(**inputs))
    _assert_close(got, expected)
    assert len(recorder.graphs) == 1 and recorder.count(NATIVE_OP) == 0


def test_auto_compiles_to_the_native_op_and_inductor_reproduces_eager():
    """The default backend (Inductor), as a user calls it; auto picks the native op for CPU tensors."""
    model = _model("sequence_classification", num_hidden_layers=1)
    inputs = _inputs("sequence_classification", length=12)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _assert_close(_outputs(compiled(**inputs)), _outputs(model(**inputs)))


# ---------------------------------------------------------------------------------------------------- train mode


def _train_step(model, run, inputs, seed):
    """Loss from the logits of ``run`` (the model or its compiled twin) computed outside the model (transformers'
    heads compute it with a data-dependent branch), and the model's gradients; dropout draws from torch's
    generator seeded with ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = run(**inputs)
    logits = next(iter(_outputs(out).values()))  # logits, start logits (QA) or the last hidden state
    loss = torch.logsumexp(logits.float(), dim=-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_train(model, compiled, inputs, tolerance=1e-5):
    model.train()
    loss, grads = _train_step(model, model, inputs, seed=11)
    compiled_loss, compiled_grads = _train_step(model, compiled, inputs, seed=11)
    assert abs(loss.item() - compiled_loss.item()) <= tolerance, (loss.item(), compiled_loss.item())
    assert grads.keys() == compiled_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        error = (compiled_grads[name] - grad).abs().max().item()
        assert error <= tolerance * max(1.0, grad.abs().max().item()), f"{name}: {error}"
    # dropout was on: another seed gives another loss
    other, _ = _train_step(model, compiled, inputs, seed=12)
    assert other.item() != compiled_loss.item()


def test_train_mode_with_dropout_on_the_reference():
    """Attention dropout on, reference backend (transformers' bernoulli masks): one graph per pass."""
    model = _model("sequence_classification", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("reference"):
        _compare_train(model, compiled, _inputs("sequence_classification"))
    assert recorder.count(NATIVE_OP) == 0


def test_train_mode_with_attention_dropout_on_the_native_op():
    """Attention dropout on, auto: the native op's counter-based dropout (seed drawn from torch's generator) runs
    inside the compiled graph and gives eager's result for the same torch seed."""
    model = _model("sequence_classification", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    _compare_train(model, compiled, _inputs("sequence_classification"))
    assert recorder.count(NATIVE_OP) == 2


def test_train_mode_on_the_native_op():
    """Hidden dropout on, attention dropout off: the native op and its backward run inside the compiled graph."""
    model = _model("masked_lm", "v2_xlarge", hidden_dropout_prob=0.1)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("cpu"):
        _compare_train(model, compiled, _inputs("masked_lm"))
    assert len(recorder.graphs) == 1 and recorder.count(NATIVE_OP) == 2


@pytest.mark.slow
def test_train_mode_with_inductor():
    """Inductor's own random numbers differ from eager's unless fallback_random is set."""
    import torch._inductor.config as inductor_config

    model = _model("token_classification", num_hidden_layers=1, hidden_dropout_prob=0.1)
    compiled = torch.compile(model, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        _compare_train(model, compiled, _inputs("token_classification"))


# ------------------------------------------------------------------------------------------------- adapter model


def _adapter_model(config_string, **overrides):
    from adapters_helpers import randomize_adapter_, tiny_model

    overrides = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, **overrides}
    model = tiny_model("v3", **overrides)
    model.add_adapter("task", config=config_string)
    model.add_classification_head("task", num_labels=3)
    randomize_adapter_(model, "task")
    model.train_adapter("task")
    return model.eval()


@pytest.mark.parametrize("config_string", ["lora[r=4, alpha=8, dropout=0.1]", "seq_bn[reduction_factor=4]"])
def test_adapter_model_with_one_adapter_compiles_fullgraph(config_string):
    model = _adapter_model(config_string)
    inputs = _inputs("sequence_classification")
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with torch.no_grad():
        _assert_close(_outputs(compiled(**inputs)), _outputs(model(**inputs)))
    assert recorder.count(NATIVE_OP, graph=0) == 2
    _compare_train(model, compiled, inputs)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".task." in n or "heads.task" in n for n in trained)


# ------------------------------------------------------------------------------------------- guards and triton


def test_changing_use_backend_recompiles_and_returning_reuses():
    model = _model("token_classification", num_hidden_layers=1)
    inputs = _inputs("token_classification")
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with torch.no_grad():
        expected = {}
        for backend in ("reference", "cpu", "reference", "cpu"):
            with use_backend(backend):
                got = compiled(**inputs).logits
                expected.setdefault(backend, model(**inputs).logits)
            torch.testing.assert_close(got, expected[backend], rtol=0, atol=TOLERANCE)
    assert len(recorder.graphs) == 2
    assert [recorder.count(NATIVE_OP, graph=i) for i in range(2)] == [0, 1]


def test_triton_backend_compiles_fullgraph_under_the_interpreter():
    """The Triton path makes no data-dependent decision either: its custom op is in the graph (the kernels run
    under TRITON_INTERPRET=1 on CPU tensors, asked for explicitly)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)")
    model = _model("sequence_classification", num_hidden_layers=1)
    inputs = _inputs("sequence_classification", length=9)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with torch.no_grad(), use_backend("triton"):
        got = _outputs(compiled(**inputs))
    with torch.no_grad(), use_backend("reference"):
        expected = _outputs(model(**inputs))
    _assert_close(got, expected)
    assert len(recorder.graphs) == 1 and recorder.count(TRITON_OP) == 1


def test_triton_lora_with_dropout_compiles_fullgraph_in_train_mode_under_the_interpreter():
    """LoRA dropout on the Triton kernels draws its seed on the host; under torch.compile that is a captured
    scalar passed to the custom op, not a graph break, and the masks equal eager mode's for the same seed."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)")
    model = _adapter_model("lora[r=4, alpha=8, dropout=0.1]", num_hidden_layers=1)
    deberta_fast.set_attention_backend(model, "reference")  # the attention kernels are slow under the interpreter
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("triton"):
        _compare_train(model, compiled, _inputs("sequence_classification", length=8))
    assert recorder.count("deberta_fast.lora", graph=0) > 0


def test_tf32_choice_of_the_triton_path_traces_and_follows_the_precision():
    """On CUDA the Triton attention reads torch.get_float32_matmul_precision() (a str: dynamo cannot trace it, and
    fullgraph=True raised on CUDA only). Its helper is a constant under tracing, and changing the precision
    recompiles instead of keeping a stale choice. Checked on the CPU: the CUDA branch itself needs a GPU."""
    from deberta_fast.ops.attention_triton import float32_matmul_allows_tf32

    recorder = Recorder()
    compiled = torch.compile(lambda x: x + (1.0 if float32_matmul_allows_tf32() else 2.0), backend=recorder,
                             fullgraph=True)
    before = torch.get_float32_matmul_precision()
    try:
        results = []
        for precision in ("highest", "high", "highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            results.append(compiled(torch.zeros(1)).item())
    finally:
        torch.set_float32_matmul_precision(before)
    assert results == [2.0, 1.0, 2.0, 1.0]
    assert 2 <= len(recorder.graphs) <= 3  # "highest" is reused; "high" and "medium" may share a graph


CUDA_KEYS = list(CLASSES) + ["adapter_lora", "adapter_seq_bn"]
ADAPTER_CONFIGS = {"adapter_lora": "lora[r=4, alpha=8, dropout=0.1]", "adapter_seq_bn": "seq_bn[reduction_factor=4]"}
ADAPTER_OPS = {"adapter_lora": "deberta_fast.lora_projections", "adapter_seq_bn": "deberta_fast.bottleneck_adapter"}


def _cuda_model_and_inputs(key, length=64):
    """A model (dropout on: hidden, attention, LoRA) and its inputs on CUDA, in eval mode."""
    if key in ADAPTER_CONFIGS:
        model, input_key = _adapter_model(ADAPTER_CONFIGS[key]), "sequence_classification"
    else:
        model, input_key = _model(key, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1), key
    inputs = {k: v.cuda() for k, v in _inputs(input_key, length=length).items()}
    return model.cuda().eval(), inputs


@pytest.mark.gpu
@pytest.mark.parametrize("key", CUDA_KEYS)
def test_cuda_every_model_class_compiles_fullgraph_on_triton(key):
    """On CUDA with the triton backend asked for explicitly (an op that cannot run on it raises): dynamo traces
    every model class and the adapter model with one LoRA / one bottleneck into one graph per pass, with the Triton
    attention op (and the adapter's Triton op) in it, and eval and train mode reproduce eager mode. aot_eager
    keeps eager's random-op order, so dropout draws the same masks and seeds for the same torch seed."""
    model, inputs = _cuda_model_and_inputs(key)
    recorder = Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with use_backend("triton"):
        with torch.no_grad():
            # fp32 in both, same kernels (TF32 off at the default "highest" precision): only op order can differ
            _assert_close(_outputs(compiled(**inputs)), _outputs(model(**inputs)))
        assert len(recorder.graphs) == 1
        assert recorder.count(TRITON_OP, graph=0) == model.config.num_hidden_layers
        if key in ADAPTER_OPS:
            assert recorder.count(ADAPTER_OPS[key], graph=0) > 0
        # gradients: the numerics policy's 1e-4 (CUDA reductions, e.g. the embedding backward, use atomics)
        _compare_train(model, compiled, inputs, tolerance=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("key", ["sequence_classification", "adapter_lora", "adapter_seq_bn"])
def test_cuda_inductor_compiles_fullgraph_on_triton(key):
    """The default backend (Inductor, which generates Triton code on CUDA) around deberta_fast's Triton ops, as a
    user calls it (``auto`` picks triton for CUDA tensors): eval and train mode reproduce eager mode. Inductor's
    random numbers equal eager's only with fallback_random."""
    import torch._inductor.config as inductor_config

    model, inputs = _cuda_model_and_inputs(key)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        # Inductor fuses and reorders fp32 reductions: 1e-4 on logits of size ~1 (numerics policy, model level)
        _assert_close(_outputs(compiled(**inputs)), _outputs(model(**inputs)), tolerance=1e-4)
    with inductor_config.patch(fallback_random=True):
        _compare_train(model, compiled, inputs, tolerance=1e-4)


# -------------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("key,config_name,backend", [
    ("sequence_classification", "v3", "cpu"),
    ("sequence_classification", "v3", "reference"),
    ("token_classification", "v2_xlarge", "cpu"),
])
def test_export_with_dynamic_batch_and_length_reproduces_the_model(key, config_name, backend):
    model = _model(key, config_name)
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=256)
    example = _inputs(key, batch=2, length=12)
    with use_backend(backend):
        program = torch.export.export(
            model, (), example, dynamic_shapes={name: {0: batch, 1: length} for name in example}
        )
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum(NATIVE_OP in op for op in ops) == (2 if backend == "cpu" else 0)
    exported = program.module()
    for shape in ((2, 12), (3, 40), (1, 7), (5, 130)):
        inputs = _inputs(key, *shape, seed=shape[1])
        with torch.no_grad(), use_backend(backend):
            expected = _outputs(model(**inputs))
        with torch.no_grad():
            _assert_close(_outputs(exported(**inputs)), expected)


def test_backend_decisions_read_no_tensor_data():
    """Dispatch under a fake-tensor trace: no .item() / .tolist() / data-dependent branch is reachable (they
    raise on fake tensors), for a spec whose log buckets skip slots too (the native op refuses it from the config)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deberta_fast.ops import attention, attention_cpu
    from deberta_fast.ops.positions import RelativePositionSpec

    skipping = RelativePositionSpec(c2p=True, p2c=True, position_buckets=16, max_relative_positions=10)
    usual = RelativePositionSpec(c2p=True, p2c=True, position_buckets=8, max_relative_positions=24)
    with FakeTensorMode():
        q = torch.randn(2, 2, 30, 8)
        for spec, chosen in ((skipping, "reference"), (usual, "cpu")):
            table = torch.randn(1, 2, spec.num_slots, 8)
            call = (q, q, q, table, table, None, spec, 0.3, 0.0, False, 0)
            assert dispatch.select(attention.OP_NAME, "auto", attention.CANDIDATES, "cpu", *call) == chosen
            reasons = " ".join(attention_cpu.unsupported_reasons(*call))
            assert ("skip slots" in reasons) == (spec is skipping)

