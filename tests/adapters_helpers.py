"""Shared helpers of the adapter tests: the AdapterHub fixture set and tiny seeded adapter models."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from configs import make_config, perturb_

def _find_fixtures() -> str:
    """$DEBERTA_FAST_ADAPTERHUB_FIXTURES, else ../shared/fixtures/adapterhub beside the repository, else the
    workplace's /work/shared copy (a clean clone elsewhere has no ../shared)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.environ.get("DEBERTA_FAST_ADAPTERHUB_FIXTURES"),
                  os.path.join(repo, "..", "shared", "fixtures", "adapterhub"), "/work/shared/fixtures/adapterhub"]
    for candidate in candidates:
        if candidate and os.path.isdir(candidate):
            return os.path.normpath(candidate)
    return os.path.normpath(candidates[1])


FIXTURES = _find_fixtures()

# The fixture cases of the methods and heads implemented here (issue 4).
METHOD_CASES = ["lora_default", "lora_qkv_ffn", "ia3", "seq_bn", "double_seq_bn", "par_bn", "stack_lora_bn",
                "average_two_lora", "merged_lora"]
HEAD_CASES = ["head_classification", "head_multilabel", "head_tagging", "head_question_answering",
              "head_multiple_choice", "head_masked_lm"]
TOLERANCE = 1e-5

needs_fixtures = pytest.mark.skipif(not os.path.isdir(FIXTURES),
                                    reason=f"AdapterHub fixtures not found at {FIXTURES}")


def case_json(case: str) -> dict:
    with open(os.path.join(FIXTURES, case, "case.json"), encoding="utf-8") as handle:
        return json.load(handle)


def fixture_config():
    from transformers import DebertaV2Config

    return DebertaV2Config.from_pretrained(os.path.join(FIXTURES, "base"))


def fixture_model():
    """DebertaV2AdapterModel with the fixture base weights (plain HF keys loaded into ``model.deberta``), eval."""
    from deberta_fast import DebertaV2AdapterModel

    model = DebertaV2AdapterModel(copy.deepcopy(fixture_config()))
    model.deberta.load_state_dict(load_file(os.path.join(FIXTURES, "base", "model.safetensors")), strict=True)
    return model.eval()


def fixture_inputs(case: str | None = None) -> dict:
    relative = case_json(case)["loader"]["inputs"] if case else "inputs.safetensors"
    path = os.path.normpath(os.path.join(FIXTURES, case or "", relative))
    return load_file(path)


def expected(case: str) -> dict:
    return load_file(os.path.join(FIXTURES, case, "expected.safetensors"))


@torch.no_grad()
def run_like_adapterhub(model, inputs) -> dict:
    """The tensors AdapterHub's fixture generator recorded for the active setup and head."""
    head_active = bool(model.active_head)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                output_hidden_states=head_active)
    result = {"last_hidden_state": out.hidden_states[-1] if head_active else out.last_hidden_state}
    for key in ("logits", "start_logits", "end_logits"):
        value = getattr(out, key, None) if head_active else None
        if value is not None:
            result[key] = value
    return result


def max_diffs(result: dict, reference: dict) -> dict:
    assert set(result) >= set(reference), f"missing outputs {set(reference) - set(result)}"
    report = {}
    for key, value in reference.items():
        assert result[key].shape == value.shape, f"{key}: shape {tuple(result[key].shape)} vs {tuple(value.shape)}"
        report[key] = float((result[key] - value).abs().max())
    return report


def tiny_model(name: str = "v3", seed: int = 0, **overrides):
    """A seeded DebertaV2AdapterModel on a named tiny config, base weights perturbed (non-zero biases), eval."""
    from deberta_fast import DebertaV2AdapterModel

    torch.manual_seed(seed)
    model = DebertaV2AdapterModel(make_config(name, **overrides))
    perturb_(model.deberta, seed=seed + 1)
    return model.eval()


def tiny_inputs(batch: int = 2, length: int = 9, vocab: int = 97, seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_SEGMENTS = (".adapters.{}.", ".loras.{}.", ".prefix_tunings.{}.", ".prefix_gates.{}.", ".refts.{}.",
             ".prompt_tunings.{}.", ".shared_parameters.{}.", ".adapter_fusion_layer.{}.")


@torch.no_grad()
def randomize_adapter_(model, name: str, seed: int = 7, scale: float = 0.2) -> None:
    """Draw every parameter of adapter (or fusion) ``name`` from N(0, scale); (IA)³ scale vectors from
    1 + N(0, scale)."""
    from deberta_fast.adapters.methods.lora import IA3

    generator = torch.Generator().manual_seed(seed)
    for key, param in model.named_parameters():
        segment = next((s.format(name) for s in _SEGMENTS if s.format(name) in key), None)
        if segment is None:
            continue
        module = model.get_submodule(key[: key.index(segment) + len(segment) - 1])
        noise = torch.randn(param.shape, generator=generator) * scale
        param.copy_(noise + 1.0 if isinstance(module, IA3) else noise)
