"""deberta-fast train: distributed equality, resume, AdapterHub-format outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from deberta_fast.training.data import bundled_path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """64 training and 24 evaluation rows of the bundled data, as JSONL and CSV."""
    root = tmp_path_factory.mktemp("data")
    with open(bundled_path("train.jsonl")) as handle:
        rows = [json.loads(line) for _, line in zip(range(88), handle)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64:]))
    for name, part in (("train.csv", rows[:64]), ("eval.csv", rows[64:])):
        lines = ["sentence,sentiment"] + ['"%s",%s' % (r["text"].replace('"', '""'), r["label"]) for r in part]
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _free_port() -> int:
    """A TCP port no one listens on now: a fixed one failed with EADDRINUSE when two test runs shared the machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(args, env_extra=None, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    prefix = [sys.executable, "-m"]
    if torchrun:
        prefix += ["torch.distributed.run", f"--nproc_per_node={torchrun}", f"--master_port={_free_port()}", "-m"]
    command = prefix + ["deberta_fast", "train", "--no-progress", "--dropout", "0", "--max-length", "32"] + args
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(directory):
    with open(os.path.join(directory, "metrics.json")) as handle:
        return json.load(handle)


def test_two_processes_give_the_losses_of_one(small_data, tmp_path):
    common = ["--train-file", str(small_data / "train.jsonl"), "--eval-file", str(small_data / "eval.jsonl"),
              "--batch-size", "8", "--max-steps", "6", "--eval-every", "0", "--adapter", "lora"]
    _run(common + ["--output-dir", str(tmp_path / "one")])
    _run(common + ["--output-dir", str(tmp_path / "two")], torchrun=2)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["processes"] == 2 and one["processes"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 6
    for step, (a, b) in enumerate(zip(one["losses"], two["losses"])):
        assert abs(a - b) <= 1e-5, f"step {step}: 1 process {a:.7f}, 2 processes {b:.7f}"


def test_resume_continues_exactly(small_data, tmp_path):
    common = ["--train-file", str(small_data / "train.csv"), "--text-column", "sentence", "--label-column",
              "sentiment", "--eval-file", str(small_data / "eval.csv"), "--batch-size", "8", "--max-steps", "12",
              "--eval-every", "0", "--adapter", "seq_bn"]
    _run(common + ["--output-dir", str(tmp_path / "whole")])
    _run(common + ["--output-dir", str(tmp_path / "parts"), "--stop-after", "5"])
    assert _metrics(tmp_path / "parts")["step"] == 5
    _run(common + ["--output-dir", str(tmp_path / "parts"), "--resume"])
    whole, parts = _metrics(tmp_path / "whole"), _metrics(tmp_path / "parts")
    assert parts["step"] == 12 and len(parts["losses"]) == 12
    for step, (a, b) in enumerate(zip(whole["losses"], parts["losses"])):
        assert abs(a - b) <= 1e-6, f"step {step}: uninterrupted {a:.7f}, resumed {b:.7f}"


def test_adapter_run_writes_adapterhub_format(small_data, tmp_path):
    out = tmp_path / "run"
    _run(["--train-file", str(small_data / "train.jsonl"), "--eval-file", str(small_data / "eval.jsonl"),
          "--batch-size", "16", "--max-steps", "2", "--adapter", "lora[r=4]", "--adapter-name", "sent",
          "--output-dir", str(out)])
    adapter_dir = out / "adapter"
    assert {"adapter_config.json", "pytorch_adapter.bin", "head_config.json", "pytorch_model_head.bin"} <= set(
        os.listdir(adapter_dir))
    head = json.loads((adapter_dir / "head_config.json").read_text())
    assert head["config"]["label2id"] == {"fresh": 0, "rotten": 1}
    metrics = _metrics(out)
    assert set(metrics) >= {"accuracy", "macro_f1", "losses", "evaluations", "train_seconds"}
    assert 0.0 <= metrics["accuracy"] <= 1.0

    from deberta_fast import DebertaV2AdapterModel
    from deberta_fast.training.default_model import default_config

    model = DebertaV2AdapterModel(default_config(8000, 32))
    name = model.load_adapter(str(adapter_dir), set_active=True)
    assert name == "sent" and model.get_labels_dict("sent") == {0: "fresh", 1: "rotten"}
