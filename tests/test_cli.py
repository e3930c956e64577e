"""The CLI as a user runs it: a real process, output on stdout, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest


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


# -- careless users: each a row of the hardening issue ----------------------------------------------

def test_export_never_replaces_its_source_or_a_users_folder(tiny_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, tmp_path):  # the source itself, and a folder holding it
        done = cli("export", str(ckpt), str(out), "--force")
        assert done.returncode == 2 and "source" in done.stderr and done.stderr.count("\n") == 1
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_a_failed_replace_puts_the_previous_export_back(tiny_export, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from gpt2_onnx.export import convert

    target = tmp_path / "export"
    shutil.copytree(tiny_export, target)
    new = tmp_path / "new"
    new.mkdir()
    rename = Path.rename

    def failing(self, destination):
        if self == new:
            raise OSError("injected: the second rename failed")
        return rename(self, destination)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="injected"):
        convert.replace_folder(new, target)
    assert (target / "gpt2_onnx.json").exists() and not list(tmp_path.glob(".export.old-*"))


def test_sigterm_during_an_export_leaves_nothing_and_stale_work_is_cleaned(tmp_path):
    import os
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "export", "random:distilgpt2",
                                str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    assert list(tmp_path.iterdir()) == []  # the temporary folder went with it
    stale = tmp_path / f".out.partial-{2**22 + os.getpid()}-abc"  # a SIGKILLed export's leftovers: no such process
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    done = cli("export", "random:tiny", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_mistakes_are_one_line_and_exit_2(tiny_export, tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {
        "unwritable OUT_DIR": (("export", "random:tiny", str(blocker / "out")), "writable"),
        "missing --eval-text": (("export", "random:tiny", str(tmp_path / "q"), "--precision", "int8", "--eval-text",
                                 str(tmp_path / "missing.txt")), "--eval-text"),
        "a checkpoint, not an export": (("generate", str(tiny_checkpoint), "Hi"), "export it first"),
        "a file as the model folder": (("generate", str(blocker), "Hi"), "is a file"),
        "no new tokens": (("generate", str(tiny_export), "Hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    }
    for name, (args, hint) in cases.items():
        done = cli(*args)
        assert done.returncode == 2, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and hint in done.stderr and "Traceback" not in done.stderr, name
    assert str(tiny_checkpoint) + " " + str(tiny_checkpoint) not in cli("generate", str(tiny_checkpoint), "Hi").stderr
    assert cli("generate", str(tiny_export), "Hi", "--threads", "-1").returncode == 2


def test_serve_says_what_is_missing_and_when_the_port_is_taken(tiny_export):
    import socket

    code = ("import sys; sys.modules['fastapi'] = None; from gpt2_onnx.cli import main; "
            f"sys.exit(main(['serve', {str(tiny_export)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "gpt2-onnx[serve]" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = cli("serve", str(tiny_export), "--port", str(taken.getsockname()[1]))
    assert done.returncode == 2 and "--port" in done.stderr and done.stderr.count("\n") == 1


def test_a_closed_pipe_ends_generate_quietly(tiny_export):
    done = subprocess.run(f"{sys.executable} -m gpt2_onnx.cli generate {tiny_export} 'Once upon' "
                          "--max-new-tokens 100 | head -c 5; exit ${PIPESTATUS[0]}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "Once " and done.stderr == ""


def test_verify_finds_a_tampered_file_and_serve_verify_refuses_it(tiny_export, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    assert cli("verify", str(folder)).returncode == 0
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    (folder / "model.onnx").write_bytes(bytes(data))
    done = cli("verify", str(folder))
    assert done.returncode == 1 and "model.onnx" in done.stderr
    refused = cli("serve", str(folder), "--verify")
    assert refused.returncode == 2 and "verification" in refused.stderr
    (folder / "model.onnx").write_bytes(bytes(data[:-10]))  # truncated: the engine's cheap size check sees it
    truncated = cli("generate", str(folder), "Hi")
    assert truncated.returncode == 2 and "truncated" in truncated.stderr


def test_help_shows_each_default_once():
    for verb in ("export", "generate", "serve", "bench"):
        text = cli(verb, "--help").stdout
        assert text.count("(default: (default") == 0 and "default: None" not in text, verb
    generate = cli("generate", "--help").stdout
    for flag, default in (("--max-new-tokens", "64"), ("--top-p", "1.0"), ("--repetition-penalty", "1.0")):
        section = generate[generate.index("\n  " + flag) + 3:].split("\n  --")[0]
        assert section.count("default") == 1 and default in section, section


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_disk_that_fills_up_during_an_export_is_one_line_and_leaves_nothing(code, tmp_path, monkeypatch, capsys):
    import errno

    from gpt2_onnx.cli import main
    from gpt2_onnx.export import convert

    def filling(source, work, *args, **kwargs):
        (work / "model.onnx").write_bytes(b"half")  # some of it written, then the disk is full
        raise OSError(getattr(errno, code), "No space left on device")
    monkeypatch.setattr(convert, "_run_stages", filling)
    assert main(["export", "random:tiny", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "filled up" in err and "OUT_DIR" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written kept


def test_other_os_errors_during_an_export_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import errno

    from gpt2_onnx.export import convert

    def failing(source, work, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(convert, "_run_stages", failing)
    with pytest.raises(OSError, match="Input/output"):
        convert.export_model("random:tiny", tmp_path / "out", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
