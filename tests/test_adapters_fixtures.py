"""Parity with AdapterHub 1.3.0 on its own saved files (fixtures in shared/fixtures/adapterhub, README there).

Each case is replayed as AdapterHub's ``load_in_adapterhub.py`` does (case.json "loader"): base weights into
``model.deberta``, ``load_adapter`` of the saved directories (torch .bin and the safetensors copies), the same
``set_active_adapters`` setup, then every tensor of expected.safetensors must match within 1e-5. Saving the loaded
adapters again must reproduce AdapterHub's files: same names, byte-identical JSON, same keys, shapes and values.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapters_helpers import (
    FIXTURES,
    HEAD_CASES,
    METHOD_CASES,
    TOLERANCE,
    case_json,
    expected,
    fixture_inputs,
    fixture_model,
    max_diffs,
    needs_fixtures,
    run_like_adapterhub,
)

pytestmark = needs_fixtures

CASES = METHOD_CASES + HEAD_CASES
FORMATS = ("bin", "safetensors")


def _setup_from_string(text: str):
    from deberta_fast.adapters.composition import blocks as composition

    blocks = {name: getattr(composition, name) for name in ("Stack", "Fuse", "Split", "BatchSplit", "Parallel",
                                                             "Average")}
    return eval(text, {"__builtins__": {}}, blocks)  # trusted strings from the fixture set


def _load_case(case: str, fmt: str):
    loader = case_json(case)["loader"]
    model = fixture_model()
    root = os.path.join(FIXTURES, case, "safetensors" if fmt == "safetensors" else "")
    names = [model.load_adapter(os.path.join(root, d), with_head=loader["with_head"],
                                use_safetensors=fmt == "safetensors") for d in loader["adapter_dirs"]]
    model.set_active_adapters(_setup_from_string(loader["setup"]))
    if loader.get("active_head"):
        model.active_head = loader["active_head"]
    return model, names, loader


def test_fixture_set_is_the_documented_one():
    config = case_json("lora_default")
    assert config["status"] == "ok"
    for case in CASES + ["no_adapter"]:
        assert case_json(case)["status"] == "ok", case
    base = fixture_model().config
    assert base.share_att_key and base.relative_attention and base.position_buckets > 0


def test_no_adapter_matches_adapterhub():
    model = fixture_model()
    diffs = max_diffs(run_like_adapterhub(model, fixture_inputs()), expected("no_adapter"))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_case_matches_adapterhub(case, fmt):
    model, _, loader = _load_case(case, fmt)
    inputs = fixture_inputs(case)
    result = run_like_adapterhub(model, inputs)
    if loader.get("merge"):
        model.merge_adapter(loader["merge"])
        result["last_hidden_state_merged"] = run_like_adapterhub(model, inputs)["last_hidden_state"]
        model.reset_adapter()
    diffs = max_diffs(result, expected(case))
    assert max(diffs.values()) <= TOLERANCE, diffs
    # the adapter must matter: the case's recorded effect is far above the tolerance
    effect = case_json(case)["adapter_effect"]["max_abs_diff_last_hidden_state_vs_no_adapter"]
    assert effect > 100 * TOLERANCE


def test_average_adapter_replayed_from_sources():
    """average_two_lora: AdapterHub averaged la and lb with weights [0.3, 0.7]; doing the same here gives its
    saved avg adapter and its output."""
    model = fixture_model()
    for name in ("la", "lb"):
        model.load_adapter(os.path.join(FIXTURES, "average_two_lora", f"adapter_{name}"), with_head=False)
    model.average_adapter("avg", ["la", "lb"], weights=[0.3, 0.7])
    saved = torch.load(os.path.join(FIXTURES, "average_two_lora", "adapter_avg", "pytorch_adapter.bin"),
                       weights_only=True)
    ours = {k: v for k, v in model.state_dict().items() if ".loras.avg." in k}
    assert set(ours) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-7)
    model.set_active_adapters("avg")
    diffs = max_diffs(run_like_adapterhub(model, fixture_inputs()), expected("average_two_lora"))
    assert max(diffs.values()) <= TOLERANCE, diffs


def _fixture_dirs(case: str, fmt: str):
    saves = [s for s in case_json(case)["saved"] if s["use_safetensors"] == (fmt == "safetensors")]
    return {s["name"]: os.path.join(FIXTURES, case, s["dir"]) for s in saves}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_saving_again_reproduces_adapterhub_files(case, fmt, tmp_path):
    model, names, _ = _load_case(case, fmt)
    for name, fixture_dir in _fixture_dirs(case, fmt).items():
        if name not in names:
            model.load_adapter(fixture_dir, with_head=True, use_safetensors=fmt == "safetensors")
        target = tmp_path / name
        model.save_adapter(str(target), name, with_head=True, use_safetensors=fmt == "safetensors")
        assert sorted(os.listdir(target)) == sorted(os.listdir(fixture_dir))
        for file_name in os.listdir(fixture_dir):
            ours, theirs = os.path.join(target, file_name), os.path.join(fixture_dir, file_name)
            if file_name.endswith(".json"):
                with open(ours, "rb") as a, open(theirs, "rb") as b:
                    assert a.read() == b.read(), file_name
                continue
            if file_name.endswith(".safetensors"):
                mine, reference = load_file(ours), load_file(theirs)
            else:
                mine, reference = (torch.load(p, weights_only=True) for p in (ours, theirs))
            assert sorted(mine) == sorted(reference), file_name
            for key, value in reference.items():
                assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
                assert torch.equal(mine[key], value), key  # exact: a saved file holds copies of the loaded tensors


def test_lora_on_query_and_key_reaches_the_position_terms():
    """share_att_key=True: query_proj / key_proj also project the relative embeddings, so their LoRA applies to
    the c2p / p2c terms. Removing it there (content only) must break parity; keeping it gives AdapterHub's output."""
    model, _, _ = _load_case("lora_qkv_ffn", "bin")
    inputs = fixture_inputs()
    reference = expected("lora_qkv_ffn")["last_hidden_state"]
    attention = model.deberta.encoder.layer[0].attention.self
    span = attention.position_spec.num_slots

    seen = []
    handle = attention.query_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    full = run_like_adapterhub(model, inputs)["last_hidden_state"]
    handle.remove()
    assert (1, span, model.config.hidden_size) in seen, seen
    assert float((full - reference).abs().max()) <= TOLERANCE

    def content_only_positions(self, rel_embeddings, batch=1):
        rel = self.pos_dropout(rel_embeddings)[: self.position_spec.num_slots].unsqueeze(0)
        key = self._heads(F.linear(rel, self.key_proj.weight, self.key_proj.bias))
        query = self._heads(F.linear(rel, self.query_proj.weight, self.query_proj.bias))
        return (key if self.position_spec.c2p else None), (query if self.position_spec.p2c else None)

    for layer in model.deberta.encoder.layer:
        module = layer.attention.self
        module.position_tables = content_only_positions.__get__(module)
    content_only = run_like_adapterhub(model, inputs)["last_hidden_state"]
    assert float((content_only - reference).abs().max()) > 1e-2
