"""ONNX export of every deberta_fast model class with both exporters, checked in ONNX Runtime.

Models are exported at one shape (B=2, L=9, with padding) and run in ONNX Runtime at another (B=3, L=17, padded
rows, holes, a fully padded row), so the dynamic batch and length axes are exercised; outputs must equal the PyTorch
model's within 1e-5 (fp32). The graph check runs every intermediate value of the exported graph and asserts that no
integer or boolean tensor holds L² elements or more (transformers' own export, checked the same way, has them).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from configs import make_config, make_mask, perturb_

onnx = pytest.importorskip("onnx", reason="the test extra installs onnx")
ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")

import deberta_fast  # noqa: E402
from deberta_fast.ops.attention_export import disentangled_attention_export, saturated_slot_table  # noqa: E402
from deberta_fast.ops.attention_reference import disentangled_attention_reference  # noqa: E402
from deberta_fast.ops.positions import RelativePositionSpec, slots_of_distances  # noqa: E402

TOLERANCE = 1e-5
EXPORT_SHAPE = (2, 9)
RUN_SHAPE = (3, 17)
HEAD_CLASSES = [
    "DebertaV2Model",
    "DebertaV2ForSequenceClassification",
    "DebertaV2ForMaskedLM",
    "DebertaV2ForTokenClassification",
    "DebertaV2ForQuestionAnswering",
    "DebertaV2ForMultipleChoice",
]


def build(class_name: str, config_name: str = "v3", seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(deberta_fast, class_name)(make_config(config_name))
    return perturb_(model, seed=seed + 1).eval()


def make_inputs(batch: int, length: int, multiple_choice: bool = False, seed: int = 0):
    """input_ids [B, L] and a [B, L] mask with padded rows (right padding, holes, a row with no valid token)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (batch, length), generator=generator)
    mask = make_mask("right", batch, length)
    mask[0] = make_mask("holes", 1, length)[0]
    if batch > 2:
        mask[-1] = 0
    if multiple_choice:  # [B, choices=2, L]; the second choice of each example is left-padded
        left = make_mask("left", batch, length).flip(0)
        input_ids = torch.stack([input_ids, input_ids.flip(-1)], dim=1)
        mask = torch.stack([mask, left], dim=1)
    return input_ids, mask


def export(model, path: str, exporter: str, multiple_choice: bool = False) -> str:
    input_ids, mask = make_inputs(*EXPORT_SHAPE, multiple_choice=multiple_choice)
    length_axis = 2 if multiple_choice else 1
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the exporters
        if exporter == "dynamo":
            batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
            shapes = {0: batch, length_axis: length}
            torch.onnx.export(model, (input_ids, mask), path, dynamo=True, input_names=names,
                              dynamic_shapes=(shapes, shapes), verbose=False)
        else:
            axes = {0: "batch", length_axis: "length"}
            torch.onnx.export(model, (input_ids, mask), path, dynamo=False, input_names=names,
                              dynamic_axes={name: axes for name in names}, opset_version=17)
    return path


def session(path: str, all_values: bool = False):
    """ONNX Runtime session; with ``all_values`` every intermediate value of the graph is an output too."""
    if not all_values:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = onnx.load(path)
    outputs = {output.name for output in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in outputs:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess, input_ids, mask):
    names = [value.name for value in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (input_ids.numpy(), mask.numpy()))))


def assert_matches_model(path: str, model, multiple_choice: bool = False):
    sess = session(path)
    for shape in (RUN_SHAPE, (1, 1), (2, 60)):  # L=60 is past the saturation radius of the small-bucket configs
        input_ids, mask = make_inputs(*shape, multiple_choice=multiple_choice, seed=shape[1])
        got = run(sess, input_ids, mask)
        with torch.no_grad():
            expected = [t.numpy() for t in model(input_ids=input_ids, attention_mask=mask).to_tuple()]
        assert len(got) == len(expected)
        for ours, reference in zip(got, expected):
            assert ours.shape == reference.shape
            assert np.abs(ours - reference).max() <= TOLERANCE, (shape, np.abs(ours - reference).max())


def large_integer_values(path: str, length: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every integer / boolean value of the graph with at least length² elements, at B=2."""
    input_ids, mask = make_inputs(2, length)
    sess = session(path, all_values=True)
    names = [output.name for output in sess.get_outputs()]
    found = []
    for name, value in zip(names, run(sess, input_ids, mask)):
        value = np.asarray(value)
        if (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_) and value.size >= length * length:
            found.append((name, value.shape))
    return found


# ---- the export-time op against the reference (no ONNX involved) ------------------------------------------------

SPECS = {
    "v3": RelativePositionSpec(c2p=True, p2c=True, position_buckets=256, max_relative_positions=512),
    "small_buckets": RelativePositionSpec(c2p=True, p2c=True, position_buckets=8, max_relative_positions=24),
    "c2p_only": RelativePositionSpec(c2p=True, p2c=False, position_buckets=16, max_relative_positions=64),
    "p2c_unbucketed": RelativePositionSpec(c2p=False, p2c=True, position_buckets=-1, max_relative_positions=12),
    "two_buckets": RelativePositionSpec(c2p=True, p2c=True, position_buckets=2, max_relative_positions=24),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_saturated_slot_table_holds_far_beyond_its_radius(name):
    spec = SPECS[name]
    radius, slots = saturated_slot_table(spec)
    assert len(slots) == 2 * radius + 1
    far = 8 * radius + 1000
    distances = torch.arange(-far, far + 1)
    expected = slots_of_distances(distances, spec)
    looked_up = torch.tensor(slots)[torch.clamp(distances + radius, 0, 2 * radius)]
    assert torch.equal(looked_up, expected)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("prefix", [0, 3])
def test_export_op_matches_reference_around_the_saturation_radius(name, prefix):
    """Lengths below, at and past the radius R (the edge padding crops for L <= R and pads beyond)."""
    spec = SPECS[name]
    radius = saturated_slot_table(spec)[0]
    generator = torch.Generator().manual_seed(7)
    for length in sorted({1, 2, 7, radius, radius + 1, radius + 2, 2 * radius + 3} - {0}):
        if length > 300:
            continue
        batch, heads, dim = 2, 2, 8
        query = torch.randn(batch, heads, length, dim, generator=generator)
        key, value = (torch.randn(batch, heads, prefix + length, dim, generator=generator) for _ in range(2))
        pos_key = torch.randn(1, heads, spec.num_slots, dim, generator=generator)
        pos_query = torch.randn(batch, heads, spec.num_slots, dim, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length // 2 + 1:] = 0
        for attention_mask, output_attentions in ((mask, True), (None, False)):
            call = (query, key, value, pos_key, pos_query, attention_mask, spec, 0.2, 0.0, output_attentions, prefix)
            ours, reference = disentangled_attention_export(*call), disentangled_attention_reference(*call)
            torch.testing.assert_close(ours[0], reference[0], atol=2e-6, rtol=0)
            if output_attentions:
                torch.testing.assert_close(ours[1], reference[1], atol=2e-6, rtol=0)


@pytest.mark.parametrize("name,lengths", [("v3", (1027, 1100)), ("c2p_only", (300,)), ("p2c_unbucketed", (60,)),
                                          ("small_buckets", (100,))])
@pytest.mark.parametrize("prefix", [0, 2])
def test_export_op_matches_reference_far_beyond_the_radius(name, lengths, prefix):
    """L > 2R + 1: the lower far region comes from the score GEMM's rank-one terms alone (zeroed by triu in the
    relative part), the upper far one from the edge column plus v_j; saturation makes both exact (v3: R = 512)."""
    spec = SPECS[name]
    assert 2 * saturated_slot_table(spec)[0] + 1 < min(lengths)
    generator = torch.Generator().manual_seed(11)
    for length in lengths:
        batch, heads, dim = 2, 1, 4
        query = torch.randn(batch, heads, length, dim, generator=generator)
        key, value = (torch.randn(batch, heads, prefix + length, dim, generator=generator) for _ in range(2))
        pos_key = torch.randn(1, heads, spec.num_slots, dim, generator=generator)
        pos_query = torch.randn(batch, heads, spec.num_slots, dim, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length - 37:] = 0
        mask[0, :5] = 0
        for attention_mask in (mask, None):
            call = (query, key, value, pos_key, pos_query, attention_mask, spec, 0.3, 0.0, False, prefix)
            ours, reference = disentangled_attention_export(*call), disentangled_attention_reference(*call)
            torch.testing.assert_close(ours[0], reference[0], atol=2e-6, rtol=0)


# ---- whole models through ONNX Runtime ----------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", HEAD_CLASSES)
def test_torchscript_exporter_every_head_class(class_name, tmp_path):
    model = build(class_name)
    multiple_choice = class_name.endswith("MultipleChoice")
    path = export(model, str(tmp_path / "model.onnx"), "torchscript", multiple_choice)
    assert_matches_model(path, model, multiple_choice)


@pytest.mark.parametrize("config_name", ["v2_xlarge", "c2p_only", "p2c_only", "absolute", "unbucketed",
                                         "small_buckets"])
def test_torchscript_exporter_every_config(config_name, tmp_path):
    model = build("DebertaV2ForSequenceClassification", config_name)
    assert_matches_model(export(model, str(tmp_path / "model.onnx"), "torchscript"), model)


@pytest.mark.parametrize("class_name", ["DebertaV2ForSequenceClassification", "DebertaV2ForMultipleChoice"])
def test_dynamo_exporter(class_name, tmp_path):
    model = build(class_name)
    multiple_choice = class_name.endswith("MultipleChoice")
    path = export(model, str(tmp_path / "model.onnx"), "dynamo", multiple_choice)
    assert_matches_model(path, model, multiple_choice)
    if not multiple_choice:
        assert large_integer_values(path, 41) == []


def test_graph_has_no_quadratic_integer_tensor(tmp_path):
    """At L=41 no integer / boolean value has L² elements; transformers' export of the same model has several
    (its [1, L, L] relative positions and [B·H, L, L] gather indices), which shows that the check can fail."""
    import transformers

    length = 41
    model = build("DebertaV2Model")
    assert saturated_slot_table(model.encoder.layer[0].attention.self.position_spec)[0] * 2 + 1 < length ** 2
    assert large_integer_values(export(model, str(tmp_path / "fast.onnx"), "torchscript"), length) == []
    torch.manual_seed(0)
    peer = transformers.DebertaV2Model(make_config("v3")).eval()
    found = large_integer_values(export(peer, str(tmp_path / "peer.onnx"), "torchscript"), length)
    assert any(shape[-2:] == (length, length) for _, shape in found)


@pytest.mark.parametrize("config_name,length,exporter", [("v3", 1100, "torchscript"), ("unbucketed", 130, "torchscript"),
                                                    ("small_buckets", 100, "torchscript"),
                                                    ("small_buckets", 100, "dynamo")])
def test_onnx_runtime_far_beyond_the_saturation_radius(config_name, length, exporter, tmp_path):
    """Exported at L=9, run at a length past 2R + 1 (v3: 256 buckets, max_relative_positions 512, R = 512; tiny
    hidden size so that it stays fast), with padding: every far-region pair goes through the saturated constants."""
    torch.manual_seed(0)
    config = make_config(config_name, hidden_size=8, num_attention_heads=2, intermediate_size=8, num_hidden_layers=1)
    model = perturb_(deberta_fast.DebertaV2ForSequenceClassification(config), seed=2).eval()
    spec = model.deberta.encoder.layer[0].attention.self.position_spec
    assert 2 * saturated_slot_table(spec)[0] + 1 < length
    path = export(model, str(tmp_path / "model.onnx"), exporter)
    input_ids, mask = make_inputs(2, length, seed=length)
    (got,) = run(session(path), input_ids, mask)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits.numpy()
    assert np.abs(got - expected).max() <= TOLERANCE


def test_graph_has_no_quadratic_transpose_and_no_double_width_buffer(tmp_path):
    """The structure that makes the export fast: no Transpose outputs an [L, L] value (p2c is moved to query rows on
    its [2r + 1, L] band instead), and no value is [L, 2L] or wider (the skew buffer is L + r + 1 wide). Checked at
    L=41 on a config whose saturation radius is R = 24, so that r = 24 < L - 1."""
    length = 41
    model = build("DebertaV2Model", "small_buckets")
    assert saturated_slot_table(model.encoder.layer[0].attention.self.position_spec)[0] == 24
    path = export(model, str(tmp_path / "fast.onnx"), "torchscript")
    graph = onnx.load(path).graph
    sess = session(path, all_values=True)
    names = [output.name for output in sess.get_outputs()]
    input_ids, mask = make_inputs(2, length)
    values = dict(zip(names, run(sess, input_ids, mask)))
    for node in graph.node:
        for name in node.output:
            shape = np.asarray(values[name]).shape if name in values else ()
            if node.op_type == "Transpose":
                assert shape[-2:] != (length, length), (node.name, shape)
            assert not (len(shape) >= 2 and shape[-2] == length and shape[-1] >= 2 * length), (node.name, shape)


def test_attention_passes_of_at_least_quadratic_size(tmp_path):
    """Every node of one layer's attention that writes at least L² values per (batch, head), Reshapes aside (free
    in ONNX Runtime), by op type: the two band row Gathers, the p2c shift (one Pad), the band Add and Transpose, the
    skew (one Pad to the [W - 1, W] buffer, one crop Pad: no Slice, no row flip), v_j's Add, Trilu, the score
    MatMul, its Add and the Softmax. The previous graph had 14 (a row flip Slice and a second crop Pad more).
    L=41 with R = 24, so that the band (2r + 1 = 49 columns) is about L wide, as at L=2048 with v3's R = 512."""
    import collections

    length = 41
    model = build("DebertaV2Model", "small_buckets")
    assert saturated_slot_table(model.encoder.layer[0].attention.self.position_spec)[0] == 24
    path = export(model, str(tmp_path / "fast.onnx"), "torchscript")
    sess = session(path, all_values=True)
    names = [output.name for output in sess.get_outputs()]
    input_ids, mask = make_inputs(2, length)
    values = dict(zip(names, run(sess, input_ids, mask)))
    per_row_pair = 2 * model.config.num_attention_heads * length * length
    found = collections.Counter(
        node.op_type
        for node in onnx.load(path).graph.node
        if "layer.0/attention" in node.name and node.op_type != "Reshape"
        and any(np.asarray(values[name]).size >= per_row_pair for name in node.output if name in values)
    )
    assert found == {"Gather": 2, "Pad": 3, "Add": 3, "Transpose": 1, "Trilu": 1, "MatMul": 1, "Softmax": 1}, found


# ---- adapter models ------------------------------------------------------------------------------------------------


def adapter_model(config: str, merge: bool):
    torch.manual_seed(0)
    model = deberta_fast.DebertaV2AdapterModel(make_config("v3"))
    model.add_adapter("task", config=config)
    model.add_classification_head("task", num_labels=3)
    model.set_active_adapters("task")
    perturb_(model, seed=5)  # LoRA's B and the bottleneck's up-projection start at zero
    if merge:
        model.merge_adapter("task")
    return model.eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("config,merge", [("lora", True), ("ia3", True), ("seq_bn", False)])
def test_adapter_model_exports(config, merge, exporter, tmp_path):
    model = adapter_model(config, merge)
    reference = adapter_model(config, False)  # unmerged twin: the merge itself must not change the outputs
    path = export(model, str(tmp_path / "adapter.onnx"), exporter)
    sess = session(path)
    input_ids, mask = make_inputs(*RUN_SHAPE, seed=3)
    got = run(sess, input_ids, mask)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits.numpy()
    assert got[0].shape == expected.shape
    assert np.abs(got[0] - expected).max() <= TOLERANCE


def test_export_with_heavily_padded_example_inputs_keeps_a_general_graph(tmp_path):
    """Example inputs that are mostly right padding would run unpadded in eager mode on the CPU: the exported graph
    must not bake their row spans in, so other masks at other shapes still match PyTorch."""
    model = build("DebertaV2ForSequenceClassification")
    input_ids = torch.randint(5, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :3] = 1
    mask[1, :2] = 1
    path = str(tmp_path / "padded.onnx")
    names = ["input_ids", "attention_mask"]
    axes = {0: "batch", 1: "length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (input_ids, mask), path, dynamo=False, input_names=names,
                          dynamic_axes={name: axes for name in names}, opset_version=17)
    other_ids = torch.randint(5, 97, (3, 10), generator=torch.Generator().manual_seed(4))
    other_mask = torch.ones(3, 10, dtype=torch.long)
    other_mask[1, 7:] = 0
    other_mask[2, :4] = 0
    (got,) = run(session(path), other_ids, other_mask)
    with torch.no_grad():
        expected = model(input_ids=other_ids, attention_mask=other_mask).logits.numpy()
    assert np.abs(got - expected).max() <= TOLERANCE
