"""The CLI as a user runs it: a real process, output on stdout, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_prompt_and_continuation(tiny_export, tiny_engine):
    done = cli("generate", str(tiny_export), "Hello world", "--max-new-tokens", "12", "--min-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    expected = tiny_engine.generate("Hello world", max_new_tokens=12, min_new_tokens=12).text
    assert done.stdout == "Hello world" + expected + "\n"


def test_seeded_sampling_from_cli_is_reproducible(tiny_export):
    args = ("generate", str(tiny_export), "Once", "--max-new-tokens", "10", "--temperature", "0.9",
            "--top-k", "40", "--seed", "5")
    assert cli(*args).stdout == cli(*args).stdout


def test_errors_are_one_line_and_exit_non_zero(tmp_path, tiny_export):
    missing = cli("generate", str(tmp_path / "nowhere"), "Hello")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    too_long = cli("generate", str(tiny_export), "Hello", "--max-new-tokens", "500")
    assert too_long.returncode == 2 and "context" in too_long.stderr and "Traceback" not in too_long.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    refused = cli("export", "random:tiny", str(occupied))
    assert refused.returncode == 2 and "--force" in refused.stderr
