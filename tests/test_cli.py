"""The deberta-fast command line: help for every option, clear errors for bad ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deberta_fast.cli import build_parser, main


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.format_help()


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_option_has_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings}: no help"


def test_module_entry_point_prints_help():
    result = subprocess.run([sys.executable, "-m", "deberta_fast", "train", "--help"], capture_output=True,
                            text=True, check=True)
    assert "--adapter" in result.stdout and "torchrun" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "0"], "--epochs: expected a finite number in (0, 1e+06]; got 0"),
        (["train", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["train", "--train-file", "/nonexistent.jsonl"], "--train-file: expected an existing .jsonl or .csv"),
        (["train", "--model", "/nonexistent"], "--model: expected a checkpoint directory"),
        (["train", "--backend", "gpu"], "--backend: backend must be one of auto, reference, triton, cpu"),
        (["train", "--warmup-ratio", "1.5"], "--warmup-ratio: expected a finite number in [0, 1)"),
        (["bench", "--cases", "attention,nope"], "--cases: unknown case(s) ['nope']"),
        (["bench", "--lengths", "12,x"], "--lengths: expected comma-separated integers"),
    ],
)
def test_bad_options_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--precision", "fp8"])
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err
