"""Parity with AdapterHub 1.3.0 for composition, fusion, prefix / prompt tuning, Compacter, ReFT and unions.

Two fixture sets, both written by AdapterHub itself:

- the shared set (shared/fixtures/adapterhub): fuse_two_seq_bn, parallel_two_bn, batchsplit_two_bn, prefix_tuning,
  prompt_tuning, compacter, loreft, in both file formats where AdapterHub could write them;
- tests/fixtures/adapterhub_composition (generate.py there): Fuse (static, all dynamic options, inside a Stack),
  Split, Average, Parallel / BatchSplit with heads, gated / flat / stacked / Parallel / BatchSplit prefixes, an
  ejected prefix (AdapterHub's own broken file), prompt after BOS with a tagging head, Compacter++ and PHM
  options, NoReFT / DiReFT / tied LoReFT, MAM / UniPELT / other unions, gating scores, fusion attentions, and
  average_adapter over prefixes, Compacters and prompts.

Every tensor must match within 1e-5; saving the loaded adapters again must give AdapterHub's files back.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from adapters_helpers import (
    FIXTURES,
    TOLERANCE,
    case_json,
    expected,
    fixture_inputs,
    fixture_model,
    max_diffs,
    needs_fixtures,
    run_like_adapterhub,
)
from deberta_fast.adapters.composition import blocks as composition
from deberta_fast.adapters.heads.prediction import MultiHeadOutput

pytestmark = needs_fixtures

SHARED_CASES = ["fuse_two_seq_bn", "parallel_two_bn", "batchsplit_two_bn", "prefix_tuning", "prompt_tuning",
                "compacter", "loreft"]
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapterhub_composition")
with open(os.path.join(HERE, "cases.json"), encoding="utf-8") as _handle:
    LOCAL_CASES = json.load(_handle)


def _setup(text: str):
    blocks = {name: getattr(composition, name) for name in ("Stack", "Fuse", "Split", "BatchSplit", "Parallel",
                                                             "Average")}
    return eval(text, {"__builtins__": {}}, blocks)  # trusted strings from the fixture sets


def _load_shared(case: str, fmt: str):
    loader = case_json(case)["loader"]
    root = os.path.join(FIXTURES, case, "safetensors" if fmt == "safetensors" else "")
    model = fixture_model()
    for directory in loader["adapter_dirs"]:
        model.load_adapter(os.path.join(root, directory), with_head=loader["with_head"],
                           use_safetensors=fmt == "safetensors")
    for directory in loader["fusion_dirs"]:
        assert model.load_adapter_fusion(os.path.join(root, directory), use_safetensors=fmt == "safetensors") == "a,b"
    model.set_active_adapters(_setup(loader["setup"]))
    return model


# AdapterHub cannot write prefix tuning as safetensors (tensors shared between the pool and its aliases): the
# shared set has no such copy; test_adapters_composition.py checks deberta_fast's own safetensors prefix files.
SHARED_RUNS = [(case, fmt) for case in SHARED_CASES for fmt in ("bin", "safetensors")
               if (case, fmt) != ("prefix_tuning", "safetensors")]


@pytest.mark.parametrize(("case", "fmt"), SHARED_RUNS)
def test_shared_case_matches_adapterhub(case, fmt):
    model = _load_shared(case, fmt)
    diffs = max_diffs(run_like_adapterhub(model, fixture_inputs(case)), expected(case))
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert case_json(case)["adapter_effect"]["max_abs_diff_last_hidden_state_vs_no_adapter"] > 100 * TOLERANCE


def _same_files(ours: str, theirs: str) -> None:
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    for name in os.listdir(theirs):
        mine, reference = os.path.join(ours, name), os.path.join(theirs, name)
        if name.endswith(".json"):
            with open(mine, "rb") as a, open(reference, "rb") as b:
                assert a.read() == b.read(), name
            continue
        read = load_file if name.endswith(".safetensors") else lambda p: torch.load(p, weights_only=True)
        a, b = read(mine), read(reference)
        assert sorted(a) == sorted(b), name
        for key in b:
            # exact: a saved file holds copies of the loaded tensors
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", ["fuse_two_seq_bn", "prefix_tuning", "compacter", "loreft", "prompt_tuning"])
def test_saving_shared_case_again_gives_adapterhubs_files(case, tmp_path):
    model = _load_shared(case, "bin")
    for saved in case_json(case)["saved"]:
        if saved.get("dir") is None:  # a save AdapterHub itself failed
            continue
        fmt = saved["use_safetensors"]
        target = tmp_path / saved["dir"]
        if saved["kind"] == "fusion":
            model.save_adapter_fusion(str(target), saved["name"], use_safetensors=fmt)
        else:
            model.save_adapter(str(target), saved["name"], with_head=True, use_safetensors=fmt)
        _same_files(str(target), os.path.join(FIXTURES, case, saved["dir"]))


def _run_local(case: str):
    spec = LOCAL_CASES[case]
    model = fixture_model()
    names = list(spec["adapters"])
    if "average" in spec:
        average_name, sources, weights = spec["average"]
        for name in sources:
            model.load_adapter(os.path.join(HERE, case, name), use_safetensors=True)
        model.average_adapter(average_name, sources, weights=weights)
        saved = load_file(os.path.join(HERE, case, average_name, "adapter.safetensors")) if os.path.exists(
            os.path.join(HERE, case, average_name, "adapter.safetensors")) else torch.load(
            os.path.join(HERE, case, average_name, "pytorch_adapter.bin"), weights_only=True)
        ours = model._adapter_state_dict(average_name)
        assert sorted(ours) == sorted(saved)
        for key, value in saved.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)
    else:
        for name in names:
            if "direft" in spec["adapters"][name]:
                # AdapterHub's DiReFT file says subtract_projection=True (it loses the flag): add the adapter with
                # its real config, then load the weights into it
                model.add_adapter(name, config=spec["adapters"][name])
            assert model.load_adapter(os.path.join(HERE, case, name), use_safetensors=True) == name
    if "fusion" in spec:
        model.load_adapter_fusion(os.path.join(HERE, case, "fusion"), use_safetensors=True)
    model.set_active_adapters(_setup(spec["setup"]))
    inputs = fixture_inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True,
                    output_adapter_gating_scores=spec.get("gating_scores", False),
                    output_adapter_fusion_attentions=spec.get("fusion_attentions", False))
    heads = out.head_outputs if isinstance(out, MultiHeadOutput) else [out]
    result = {}
    if spec.get("heads"):
        for i, head_out in enumerate(heads):
            result[f"logits_{i}"] = head_out.logits
        if isinstance(out, MultiHeadOutput):
            model.active_head = None
            with torch.no_grad():
                result["last_hidden_state"] = model(**inputs).last_hidden_state
        else:
            result["last_hidden_state"] = out.hidden_states[-1]
    else:
        result["last_hidden_state"] = out.last_hidden_state
    for key, tree in (("gate", "adapter_gating_scores"), ("fusion", "adapter_fusion_attentions")):
        for name, layers in (out[tree] if tree in out else {}).items():
            for layer, locations in layers.items():
                for location, value in locations.items():
                    result[f"{key}.{name}.{layer}.{location}"] = torch.as_tensor(value)
    return model, result


@pytest.mark.parametrize("case", [c for c in LOCAL_CASES if not LOCAL_CASES[c].get("singles")])
def test_local_case_matches_adapterhub(case):
    _, result = _run_local(case)
    reference = load_file(os.path.join(HERE, case, "expected.safetensors"))
    reference = {k: v for k, v in reference.items() if not k.startswith("single_")}
    assert set(result) == set(reference)
    diffs = max_diffs(result, reference)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_ejected_prefix_saved_by_adapterhub_loads_flat():
    """AdapterHub writes an ejected prefix with flat=False but flat tensors (its reload fails); it loads here as the
    flat form, and saving it again records flat=True."""
    model, _ = _run_local("prefix_eject")
    config = model.adapters_config.get("p")
    assert config.flat is True
    keys = [k for k in model.state_dict() if ".prefix_tunings.p." in k]
    assert keys == ["deberta.prefix_tuning.prefix_tunings.p.self_prefix.control_trans"]
