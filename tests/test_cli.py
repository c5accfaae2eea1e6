"""The `bitnet158` command line, run as a user runs it: a subprocess, checking stdout, stderr and exit code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet158.cli.model_loading import embedded_model_path


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bitnet158", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(embedded_model_path(), folder)
    return folder


def test_generate_with_embedded_model_continues_the_prompt():
    result = run_cli("generate", "def fibonacci(n):", "--max-new-tokens", "24", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert len(result.stdout.strip()) > len("def fibonacci(n):") + 10


def test_generate_reads_prompt_from_stdin_and_greedy_is_repeatable():
    first = run_cli("generate", "--max-new-tokens", "12", stdin="import os\n")
    second = run_cli("generate", "-", "--max-new-tokens", "12", stdin="import os\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("import os\n")


def test_info_reports_parameters_and_bytes():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for key in ("parameters", "bits per weight", "bytes on disk", "bytes in memory"):
        assert key in result.stdout


def test_chat_answers_each_turn():
    result = run_cli("chat", "--max-new-tokens", "8", "--seed", "1", stdin="hello\nwhat is a list?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3  # two turns, then the prompt that meets end of input


def test_config_missing_field_names_the_field(model_copy: Path):
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_size"', '"hidden_size_renamed"'))
    assert_one_line_error(run_cli("info", "--model", str(model_copy)), "config.json", "missing field 'hidden_size'")


def test_truncated_safetensors_names_the_file(model_copy: Path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cli("generate", "x", "--model", str(model_copy)), "model.safetensors")


def test_missing_model_folder_and_bad_values_are_one_line_errors(tmp_path: Path):
    assert_one_line_error(run_cli("info", "--model", str(tmp_path / "nope")), "nope")
    assert_one_line_error(run_cli("generate", "x", "--temperature", "-1"), "temperature")
    assert_one_line_error(run_cli("generate", "x", "--device", "tpu"), "--device")
