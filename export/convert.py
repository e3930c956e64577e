"""Export as one template: load -> to-onnx -> check -> manifest -> rename into place.

Everything is written into a hidden temporary folder beside OUT_DIR and renamed at the end, so a
failure or Ctrl-C leaves no partial folder behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict


def export_model(source: str, out_dir: str | Path, *, force: bool = False, log: Log = print) -> ExportResult:
    """Export `source` (hub id, local folder or random:<preset>) to an ONNX folder at `out_dir`."""
    out_dir = Path(out_dir)
    check_destination(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        manifest = _run_stages(source, work, log)
        replace_folder(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {out_dir} ({manifest['size_bytes'] / 1e6:.1f} MB, "
        f"max |Δlogit| vs PyTorch {manifest['parity']['max_abs_logit_diff']:.2e})")
    return ExportResult(out_dir, manifest)


def _run_stages(source: str, work: Path, log: Log) -> dict:
    from .load import load_checkpoint
    from .manifest import write_manifest
    from .parity import measure_parity
    from .to_onnx import export_reference_graph

    stages = _Stages(log, total=4)
    with stages("load", source):
        checkpoint = load_checkpoint(source)
    with stages("to-onnx", "Optimum text-generation-with-past"):
        model_path = export_reference_graph(checkpoint.model, work)
        checkpoint.model.config.save_pretrained(work)
        checkpoint.tokenizer.save_pretrained(work)
    with stages("check", "onnx.checker, then parity with PyTorch"):
        _check_graph(model_path)
        parity = measure_parity(checkpoint.model, work)
    with stages("manifest", "hashes and versions"):
        return write_manifest(work, source=source, source_kind=checkpoint.kind,
                              config=checkpoint.model.config.to_dict(), precision="fp32", graph="reference",
                              parity=parity)


def _check_graph(model_path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(model_path))  # path form: works past 2 GB with external data


def check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise Gpt2OnnxError(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise Gpt2OnnxError(f"{out_dir} exists and is not empty; pass --force to replace it")


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing what was there with two renames (never a half-written target)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Stages:
    """Prints `[2/4] to-onnx (detail) ... 3.1 s` for each stage."""

    def __init__(self, log: Log, total: int) -> None:
        self.log, self.total, self.done = log, total, 0

    @contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {name}" + (f" ({detail})" if detail else "") + " ...")
        start = time.perf_counter()
        yield
        self.log(f"      {name} done in {time.perf_counter() - start:.1f} s")
