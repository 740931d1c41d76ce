"""deberta-fast refuses what it cannot do right, with one line naming the option or file (issue 13, findings 5-10;
issue 15 item 7: where bench and train write their files)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from deberta_fast.cli import main
from deberta_fast.training import checkpoint, loop
from deberta_fast.training.data import bundled_path, check_labels, read_labelled
from deberta_fast.training.options import TrainOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """48 training and 16 evaluation rows of the bundled data (JSONL)."""
    root = tmp_path_factory.mktemp("data")
    with open(bundled_path("train.jsonl")) as handle:
        rows = [json.loads(line) for _, line in zip(range(64), handle)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return root


def run_cli(argv, capsys) -> str:
    """main(argv) must exit with code 2; returns the one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_model_building(monkeypatch):
    """Option errors must come before any model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(loop, "_build_model", refuse)


# ---- finding 5: data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", 'text,label\n"good film",pos\n"no label",\n', "a.csv:3: the label 'label' is ''"),
    ("b.csv", 'text,label\n"good film",pos\n"short row"\n', "b.csv:3: the label 'label' is missing"),
    ("c.jsonl", '{"text": "fine", "label": "pos"}\n{"text": null, "label": "neg"}\n', "c.jsonl:2: the text 'text' is missing"),
    ("d.jsonl", '{"text": "fine", "label": "pos"}\n\n[1, 2]\n', "d.jsonl:3: expected a JSON object"),
    ("e.jsonl", '{"text": "fine", "label": null}\n', "e.jsonl:1: the label 'label' is missing"),
    ("f.jsonl", '{"text": 5, "label": "pos"}\n', "f.jsonl:1: the text 'text' is 5"),
])
def test_bad_rows_are_refused_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        read_labelled(str(path))
    assert str(error.value).startswith(str(tmp_path)) and message in str(error.value)


def test_non_utf8_file_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8"):
        read_labelled(str(path))


def test_single_training_label_and_unseen_eval_labels_are_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n')
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"text": "c", "label": "pos"}\n\n{"text": "d", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl: the training data has a single label \['pos'\]"):
        check_labels(read_labelled(str(train)), read_labelled(str(evaluation)))
    train.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:3: label 'neutral' does not occur in the training data"):
        check_labels(read_labelled(str(train)), read_labelled(str(evaluation)))


def test_cli_reports_a_data_error_as_one_line(tmp_path, small_data, capsys, no_model_building):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": null, "label": "fresh"}\n')
    err = run_cli(["train", "--train-file", str(bad), "--eval-file", str(small_data / "eval.jsonl"),
                   "--output-dir", str(tmp_path / "out"), "--no-progress"], capsys)
    assert f"{bad}:1" in err


# ---- finding 6: options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "--learning-rate", "inf"], "--learning-rate: expected a finite number in (0, 10]; got inf"),
    (["train", "--learning-rate", "nan"], "--learning-rate: expected a finite number in (0, 10]; got nan"),
    (["train", "--learning-rate", "0"], "--learning-rate: expected a finite number in (0, 10]; got 0"),
    (["train", "--epochs", "inf"], "--epochs: expected a finite number in (0, 1e+06]; got inf"),
    (["train", "--epochs", "0"], "--epochs: expected a finite number in (0, 1e+06]; got 0"),
    (["train", "--weight-decay", "-5"], "--weight-decay: expected a finite number in [0, 1000]; got -5"),
    (["train", "--dropout", "nan"], "--dropout: expected a finite number in [0, 1); got nan"),
    (["bench", "--repeats", "-1"], "--repeats: expected an integer >= 1; got -1"),
    (["bench", "--repeats", "0"], "--repeats: expected an integer >= 1; got 0"),
    (["bench", "--tokens", "0"], "--tokens: expected an integer >= 1; got 0"),
    (["bench", "--tokens", "-5"], "--tokens: expected an integer >= 1; got -5"),
    (["bench", "--cases", ""], "--cases: expected a comma-separated subset"),
    (["bench", "--cases", "model,nope"], "--cases: unknown case(s) ['nope']"),
    (["bench", "--model-shapes", "512"], "--model-shapes: expected comma-separated LENGTH:LAYERS pairs"),
    (["bench", "--model-shapes", "512:0"], "--model-shapes: LENGTH and LAYERS must be >= 1"),
])
def test_bad_options_are_refused_before_anything_runs(argv, message, capsys, monkeypatch, no_model_building):
    from deberta_fast.benchmark import suite

    monkeypatch.setattr(suite.harness, "machine_facts", lambda: pytest.fail("the bench started before checking"))
    assert message in run_cli(argv, capsys)


def test_non_finite_loss_stops_the_run_and_overwrites_nothing(tmp_path, small_data, monkeypatch):
    original = loop._build_model
    state = {"steps": 0}

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        forward = model.forward

        def poisoned(*a, **k):
            out = forward(*a, **k)
            if model.training:
                state["steps"] += 1
                if state["steps"] >= 3:  # the loss an overflow (--learning-rate too high) ends in
                    out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(loop, "_build_model", build)
    out = tmp_path / "run"
    options = TrainOptions(output_dir=str(out), train_file=str(small_data / "train.jsonl"),
                           eval_file=str(small_data / "eval.jsonl"), batch_size=8, max_steps=6, eval_every=2,
                           adapter="lora", max_length=16, dropout=0.0, progress=False)
    with pytest.raises(loop.TrainingDiverged, match=r"step 3: the training loss is nan .* checkpoint of step 2"):
        loop.train(options)
    payload = torch.load(out / checkpoint.FILE, weights_only=False)
    assert payload["state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()


# ---- findings 7 and 8: --resume and --output-dir ---------------------------------------------------------------


def run_train(args, **env):
    command = [sys.executable, "-m", "deberta_fast", "train", "--no-progress", "--dropout", "0", "--max-length",
               "16", "--batch-size", "8", "--adapter", "lora"] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_resume_refuses_changed_options_and_allows_the_documented_ones(tmp_path, small_data):
    data = ["--train-file", str(small_data / "train.jsonl"), "--eval-file", str(small_data / "eval.jsonl"),
            "--output-dir", str(tmp_path / "run"), "--eval-every", "0"]
    first = run_train(data + ["--max-steps", "4", "--stop-after", "2"])
    assert first.returncode == 0, first.stderr[-2000:]
    refused = run_train(data + ["--max-steps", "4", "--resume", "--learning-rate", "0.002", "--batch-size", "4",
                                "--seed", "3"])
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()[-1]
    for difference in ("--learning-rate 0.001 -> 0.002", "--batch-size 8 -> 4", "--seed 0 -> 3"):
        assert difference in err, err
    shrink = run_train(data + ["--max-steps", "3", "--resume"])
    assert shrink.returncode == 2 and "--max-steps 4 -> 3" in shrink.stderr
    allowed = run_train(data + ["--max-steps", "5", "--resume", "--eval-every", "2", "--backend", "reference"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 5
    help_text = subprocess.run([sys.executable, "-m", "deberta_fast", "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--eval-every" in help_text.split("--resume", 2)[-1] and "--max-steps upward" in help_text


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    from adapters_helpers import tiny_model

    def parts(model):
        model.add_adapter("t", config="lora")
        model.train_adapter("t")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    checkpoint.save(str(tmp_path), *parts(tiny_model()), checkpoint.RunState(step=3))
    other = parts(tiny_model(hidden_size=48, intermediate_size=96))
    with pytest.raises(ValueError, match=r"another model configuration \(hidden_size: 32 -> 48"):
        checkpoint.load(str(tmp_path), *other)


def test_unwritable_output_dir_fails_before_training(tmp_path, small_data, capsys, no_model_building):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = run_cli(["train", "--output-dir", str(blocker / "out"), "--train-file", str(small_data / "train.jsonl"),
                   "--eval-file", str(small_data / "eval.jsonl"), "--no-progress"], capsys)
    assert f"--output-dir: cannot write to '{blocker / 'out'}'" in err


# ---- finding 9: the CLI's errors, environment and --model ------------------------------------------------------


@pytest.mark.parametrize("error, expected", [
    ("backend", "the native CPU op could not be built"),
    ("oserror", "/data/x.bin: No such file or directory"),
    ("diverged", "the training loss is nan"),
])
def test_package_errors_are_one_line_with_exit_code_2(error, expected, capsys, monkeypatch):
    from deberta_fast.ops.dispatch import BackendUnavailable

    def train(options):
        if error == "backend":
            raise BackendUnavailable("backend 'cpu' cannot serve disentangled_attention: the native CPU op could "
                                     "not be built (BuildFailed: ...)")
        if error == "oserror":
            raise FileNotFoundError(2, "No such file or directory", "/data/x.bin")
        raise loop.TrainingDiverged("step 3: the training loss is nan (not finite)")

    monkeypatch.setattr(loop, "train", train)
    assert expected in run_cli(["train"], capsys)


def test_backend_defaults_to_the_environment_variable(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(loop, "train", lambda options: (seen.append(options.backend),
                                                        {"accuracy": 1.0, "macro_f1": 1.0})[1])
    monkeypatch.setenv("DEBERTA_FAST_BACKEND", "reference")
    assert main(["train"]) == 0
    assert main(["train", "--backend", "cpu"]) == 0
    monkeypatch.delenv("DEBERTA_FAST_BACKEND")
    assert main(["train"]) == 0
    assert seen == ["reference", "cpu", "auto"]
    monkeypatch.setenv("DEBERTA_FAST_BACKEND", "gpu")
    assert "environment variable DEBERTA_FAST_BACKEND (the default of --backend)" in run_cli(["train"], capsys)


def test_model_folder_without_config_json_is_named(tmp_path, capsys, no_model_building):
    (tmp_path / "spm.model").write_bytes(b"")
    err = run_cli(["train", "--model", str(tmp_path)], capsys)
    assert f"--model: {tmp_path} has no config.json" in err


# ---- finding 10: config strings and files ----------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ("lora[r=2.5]", "LoRAConfig: r must be an integer >= 1; got 2.5"),
    ("lora[r=True]", "LoRAConfig: r must be an integer >= 1; got True"),
    ("lora[dropout=1.5]", "LoRAConfig: dropout must be a number in [0, 1); got 1.5"),
    ("seq_bn[reduction_factor=0]", "reduction_factor must be a number > 0 or a per-layer mapping; got 0"),
    ("", "config: an empty string"),
])
def test_bad_config_values_are_refused_at_config_time(config, message):
    from deberta_fast.adapters.configuration import AdapterConfig

    with pytest.raises((ValueError, TypeError)) as error:
        AdapterConfig.load(config)
    assert message in str(error.value)


def test_config_value_errors_are_both_value_and_type_errors():
    from deberta_fast.adapters.configuration import AdapterConfig

    for kind in (ValueError, TypeError):
        with pytest.raises(kind):
            AdapterConfig.load("lora[r=2.5]")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config"].update(r="eight"), "r must be an integer >= 1; got 'eight'"),
    (lambda c: c.update(config=None), "'config' must be an object"),
])
def test_bad_adapter_config_json_names_the_file_and_option(tmp_path, edit, message):
    from adapters_helpers import tiny_model

    model = tiny_model()
    model.add_adapter("a", config="lora")
    model.save_adapter(str(tmp_path / "a"), "a")
    path = tmp_path / "a" / "adapter_config.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    with pytest.raises((ValueError, TypeError)) as error:
        tiny_model().load_adapter(str(tmp_path / "a"))
    assert str(path) in str(error.value) and message in str(error.value)


def test_adapter_cli_option_with_a_bad_value_is_one_line(tmp_path, small_data, capsys):
    err = run_cli(["train", "--adapter", "lora[r=2.5]", "--train-file", str(small_data / "train.jsonl"),
                   "--eval-file", str(small_data / "eval.jsonl"), "--output-dir", str(tmp_path / "o"),
                   "--no-progress", "--max-steps", "1"], capsys)
    assert "r must be an integer >= 1; got 2.5" in err


# ---- issue 15 item 7: where bench and train write ----------------------------------------------------------------


def test_bench_writes_into_the_current_directory_or_out(tmp_path):
    results = os.path.join(REPO, "bench", "results")
    before = {n: os.path.getmtime(os.path.join(results, n)) for n in os.listdir(results)} \
        if os.path.isdir(results) else {}
    command = [sys.executable, "-m", "deberta_fast", "bench", "--quick", "--cases", "bottleneck", "--tokens", "32",
               "--repeats", "1", "--device", "cpu"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "suite_cpu_quick.csv").is_file() and (tmp_path / "suite_cpu_quick.png").is_file()
    second = subprocess.run(command + ["--out", "elsewhere"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (tmp_path / "elsewhere" / "suite_cpu_quick.csv").is_file()
    after = {n: os.path.getmtime(os.path.join(results, n)) for n in os.listdir(results)} \
        if os.path.isdir(results) else {}
    assert after == before, "the bench wrote into the source checkout"


def test_matplotlib_is_installed_with_the_package():
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    assert "matplotlib" in [ast.literal_eval(e).split(";")[0].split(">")[0].strip() for e in requires.elts]


def test_training_png_is_written_and_a_missing_matplotlib_is_explained(tmp_path, small_data, monkeypatch, capsys):
    options = dict(train_file=str(small_data / "train.jsonl"), eval_file=str(small_data / "eval.jsonl"),
                   batch_size=8, max_steps=2, eval_every=0, adapter="lora", max_length=16, dropout=0.0,
                   progress=False)
    loop.train(TrainOptions(output_dir=str(tmp_path / "with"), **options))
    assert (tmp_path / "with" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    loop.train(TrainOptions(output_dir=str(tmp_path / "without"), **options))
    assert not (tmp_path / "without" / "training.png").exists()
    assert "no plot: matplotlib is missing (pip install matplotlib)" in capsys.readouterr().out


def test_checkpoint_write_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from adapters_helpers import tiny_model

    model = tiny_model()
    model.add_adapter("t", config="lora")
    model.train_adapter("t")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save(str(tmp_path), model, optimizer, scheduler, checkpoint.RunState(step=1))
    before = (tmp_path / checkpoint.FILE).read_bytes()

    def half_written(payload, handle):
        handle.write(b"PK\x03\x04 a truncated archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(str(tmp_path), model, optimizer, scheduler, checkpoint.RunState(step=2))
    assert (tmp_path / checkpoint.FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.FILE]
