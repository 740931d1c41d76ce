"""The prepared GPU check is complete (its dry run imports everything, finds its files and prints its plan), and
the tuned-tile table it writes is what the attention launchers read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from deberta_fast.benchmark import gpu_check
from deberta_fast.triton_kernels import attention_tiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_every_step_and_runs_nothing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env=dict(env, PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in gpu_check.STEPS:
        assert f"[{step}" in proc.stdout
    assert "-m pytest" in proc.stdout and "gpu_attention" in proc.stdout and "gpu_adapters" in proc.stdout
    assert "dry run: nothing run" in proc.stdout
    total = sum(gpu_check.DEFAULT_LIMITS.values())
    assert total <= 8 * 60 - 30, "the step limits must leave the 8-minute budget room for start-up"


def test_sweep_winners_merge_into_the_table_and_reach_the_launcher(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"note": "n", "entries": {"forward/sm_80/float16/64": {
        "BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}}}))
    winner = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "ms": 1.0}
    gpu_check._write_table({"forward/sm_90/bfloat16/64": winner}, str(path))
    data = json.loads(path.read_text())
    assert data["note"] == "n" and set(data["entries"]) == {"forward/sm_80/float16/64", "forward/sm_90/bfloat16/64"}

    monkeypatch.setattr(attention_tiles, "TABLE_PATH", str(path))
    monkeypatch.setattr(attention_tiles, "current_target", lambda: "sm_90")
    attention_tiles._table.cache_clear()
    try:
        tiles = attention_tiles.attention_tiles("forward", torch.bfloat16, 64, 4096, interpret=False)
        assert tiles == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        # capped by the length; no entry (fp16 on sm_90) -> the defaults
        assert attention_tiles.attention_tiles("forward", torch.bfloat16, 64, 40, False)["BLOCK_M"] == 64
        assert attention_tiles.attention_tiles("forward", torch.float16, 64, 4096, False) == \
            attention_tiles.default_tiles("forward", torch.float16, 64, False, "sm_90")
        assert [e["target"] for e in attention_tiles.table_entries()] == ["sm_80", "sm_90"]
    finally:
        attention_tiles._table.cache_clear()


def test_tests_step_runs_the_cuda_compile_tests():
    """The CUDA-only torch.compile tests (every model class and the adapter model on the Triton kernels, issue 12
    item 2) are marked ``gpu`` (skipped here, run on a CUDA machine) and the GPU check's test step keeps them."""
    (entry,) = gpu_check.plan("any", dict(gpu_check.DEFAULT_LIMITS), ["tests"], sys.executable)
    command = entry["command"]
    assert os.path.join(REPO, "tests") in command
    pytest_args = command[command.index("pytest") + 1:]
    assert not any(arg.startswith(("-k", "-m")) for arg in pytest_args), "no keyword or marker filter"
    assert not any("test_compile_export" in arg for arg in pytest_args), "the file is neither ignored nor deselected"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu", os.path.join(REPO, "tests", "test_compile_export.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::test_cuda_" in line]
    classes = ["model", "sequence_classification", "masked_lm", "token_classification", "question_answering",
               "multiple_choice", "adapter_lora", "adapter_seq_bn"]
    for key in classes:
        assert any(f"test_cuda_every_model_class_compiles_fullgraph_on_triton[{key}]" in line for line in collected)
    assert sum("test_cuda_inductor_compiles_fullgraph_on_triton[" in line for line in collected) == 3
