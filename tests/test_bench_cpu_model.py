"""The cpu_model benchmark's pieces: its padded workload, the GEMM floor's shapes, and that its ONNX Runtime
column computes transformers' outputs (padded and not) at another length than the export's."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from deberta_fast.benchmark import cpu_model
from configs import make_config, perturb_


def test_padded_workload_has_seven_half_padded_rows():
    work = next(w for w in cpu_model.workloads(quick=False) if w["name"] == "fwd_B8_pad")
    inputs = cpu_model.make_inputs(work)
    mask = inputs["attention_mask"]
    assert mask.shape == (8, 128)
    assert mask[0].sum().item() == 128
    assert mask[1:].sum(-1).tolist() == [64] * 7
    assert not inputs["input_ids"][mask == 0].any()


def test_gemm_floor_counts_every_linear_of_v3_base():
    work = next(w for w in cpu_model.workloads(quick=False) if w["name"] == "fwd_L512")
    flops = sum(2 * t * i * o for t, i, o in cpu_model.linear_shapes(work))
    per_layer = 2 * 512 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 2 * 512 * 768 * 768  # tokens + 2·256 position rows
    assert flops == 12 * per_layer


@pytest.mark.parametrize("kind", ["full", "right"])
def test_onnx_export_of_transformers_matches_transformers(tmp_path, kind):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = perturb_(hf.DebertaV2Model(make_config("v3"))).eval()
    generator = torch.Generator().manual_seed(1)
    export_inputs = {"input_ids": torch.randint(1, 97, (2, 16), generator=generator),
                     "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    path = str(tmp_path / "model.onnx")
    cpu_model.export_onnx(model, export_inputs, path)
    session = cpu_model.ort_session(path)
    ids = torch.randint(1, 97, (3, 24), generator=generator)
    mask = torch.ones(3, 24, dtype=torch.long)
    if kind == "right":
        mask[1, 10:] = 0
        mask[2, 3:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert (torch.from_numpy(got) - expected).abs().max().item() <= 1e-4
