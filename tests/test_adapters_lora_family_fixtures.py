"""Parity with AdapterHub 1.3.0 for DoRA, DvoRA, VeRA and MTL-LoRA.

tests/fixtures/adapterhub_lora_family/ was written by AdapterHub itself (generate.py there, run in a separate
environment with ``pip install adapters==1.3.0``) on the shared fixture set's base model and inputs: adapters saved
by AdapterHub must load here and reproduce its outputs within 1e-5.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from adapters_helpers import TOLERANCE, fixture_inputs, fixture_model, needs_fixtures
from deberta_fast.adapters import AdapterConfig, MultiTask, Stack

pytestmark = needs_fixtures

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapterhub_lora_family")
with open(os.path.join(HERE, "cases.json"), encoding="utf-8") as _handle:
    CASES = json.load(_handle)


def _load_case(case):
    model = fixture_model()
    names = [model.load_adapter(os.path.join(HERE, case, f"a{j}")) for j in range(len(CASES[case]["adapters"]))]
    assert names == [f"a{j}" for j in range(len(names))]
    return model, names


def _run(model, **kwargs):
    inputs = fixture_inputs()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs).last_hidden_state


def _same_draw(ours, theirs) -> bool:
    """The same random draw: equal up to 2 ulps. The generator's bits are the same on every CPU, but turning them
    into uniform(-b, b) values runs in another vector code path per ISA (ATEN_CPU_CAPABILITY=default differs from
    AVX-512 by 1 ulp, 1.2e-7 at |x| ~ 1)."""
    ours, theirs = ours.detach().float(), theirs.float()
    return bool(((ours - theirs).abs() <= 2 * torch.finfo(torch.float32).eps * theirs.abs() + 1e-7).all())


def _max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", sorted(c for c in CASES if "task_ids" not in CASES[c] and
                                         not CASES[c].get("keep_init")))
def test_adapterhub_adapters_reproduce_its_outputs(case):
    spec = CASES[case]
    model, _ = _load_case(case)
    model.set_active_adapters(eval(spec.get("setup", "'a0'"), {"__builtins__": {}}, {"Stack": Stack}))
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    out = _run(model)
    assert _max_diff(out, expected["last_hidden_state"]) <= TOLERANCE
    # the adapter changes the output (else the comparison above proves nothing about the method)
    model.set_active_adapters(None)
    assert _max_diff(_run(model), expected["last_hidden_state"]) > 1e-3


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c].get("merge")))
def test_merge_is_exact_and_reset_restores(case):
    model, _ = _load_case(case)
    model.set_active_adapters("a0")
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    weights = {k: v.clone() for k, v in model.deberta.state_dict().items()}
    model.merge_adapter("a0")
    merged = _run(model)
    # ours: merging never changes the output, for DoRA too (the rescaling of the bias and s = alpha / r included)
    assert _max_diff(merged, expected["last_hidden_state"]) <= TOLERANCE
    adapterhub_merge_error = _max_diff(expected["merged"], expected["last_hidden_state"])
    if CASES[case]["adapters"][0].startswith("vera"):
        assert _max_diff(merged, expected["merged"]) <= TOLERANCE  # AdapterHub's VeRA merge is exact too
    else:
        # AdapterHub's DoRA merge drops s = alpha / r and leaves the bias unscaled: its merged output is off
        assert adapterhub_merge_error > 1e-3
    model.reset_adapter()
    for key, value in model.deberta.state_dict().items():
        assert torch.equal(value, weights[key]), key  # reset puts the saved tensors back
    assert _max_diff(_run(model), expected["last_hidden_state"]) <= TOLERANCE


@pytest.mark.parametrize("case", sorted(c for c in CASES if "average" in CASES[c]))
def test_average_adapter_matches_adapterhub(case):
    spec = CASES[case]
    model, names = _load_case(case)
    average_name, weights = spec["average"]
    model.average_adapter(average_name, names, weights=weights)
    saved = load_file(os.path.join(HERE, case, average_name, "adapter.safetensors"))
    ours = model._adapter_state_dict(average_name)
    assert set(ours) == set(saved)
    for key, value in saved.items():
        assert _max_diff(ours[key], value) <= 1e-6, key
    model.set_active_adapters(average_name)
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    assert _max_diff(_run(model), expected["average"]) <= TOLERANCE


@pytest.mark.parametrize("case", ["vera_seeded", "dvora_seeded"])
def test_vera_seed_draws_adapterhubs_shared_matrices(case):
    """The shared random matrices are saved as AdapterHub drew them from init_weights_seed (the generator does not
    redraw them); adding the same config here must draw the same matrices."""
    saved = load_file(os.path.join(HERE, case, "a0", "adapter.safetensors"))
    with open(os.path.join(HERE, case, "a0", "adapter_config.json"), encoding="utf-8") as handle:
        config = AdapterConfig.load(json.load(handle)["config"])
    assert config.init_weights_seed
    model = fixture_model()
    model.add_adapter("a0", config=config)
    shared = model.deberta.shared_parameters["a0"]
    for key in ("lora_A", "lora_B"):
        reference = saved[f"deberta.shared_parameters.a0.{key}"]
        assert shared[key].shape == reference.shape
        assert _same_draw(shared[key], reference), (key, _max_diff(shared[key], reference))
        assert not shared[key].requires_grad


@pytest.mark.parametrize("case", sorted(c for c in CASES if "task_ids" in CASES[c]))
def test_multitask_routes_rows_like_single_adapter_runs(case):
    """MultiTask crashes in AdapterHub with share_att_key=True; the reference of row i is AdapterHub's run with
    adapter a<task_ids[i]> on every row."""
    spec = CASES[case]
    model, names = _load_case(case)
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    model.set_active_adapters(MultiTask(*names))
    for task_ids in (spec["task_ids"], [names[t] for t in spec["task_ids"]]):
        out = _run(model, task_ids=task_ids)
        for row, task in enumerate(spec["task_ids"]):
            task = task if isinstance(task, int) else names.index(task)
            assert _max_diff(out[row], expected[f"task{task}"][row]) <= TOLERANCE, (row, task)
    for j, name in enumerate(names):
        model.set_active_adapters(name)
        assert _max_diff(_run(model), expected[f"task{j}"]) <= TOLERANCE


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c].get("keep_init")))
def test_seeded_initialisation_draws_adapterhubs_values(case):
    """These files hold AdapterHub's untouched initialisation from init_weights_seed (LoRA / DoRA / MTL-LoRA per
    layer, VeRA's shared matrices, DoRA magnitudes): adding the same config string here draws the same tensors."""
    saved = load_file(os.path.join(HERE, case, "a0", "adapter.safetensors"))
    model = fixture_model()
    model.add_adapter("a0", config=CASES[case]["adapters"][0], set_active=True)
    ours = model._adapter_state_dict("a0")
    assert set(ours) == set(saved)
    for key, value in saved.items():
        assert _same_draw(ours[key], value), (key, _max_diff(ours[key], value))
    assert any(float(v.abs().max()) > 0 and v.numel() > 1 for k, v in saved.items() if "lora_A" in k)
    expected = load_file(os.path.join(HERE, case, "expected.safetensors"))
    assert _max_diff(_run(model), expected["last_hidden_state"]) <= TOLERANCE
