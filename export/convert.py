"""Export as one template: load -> to-onnx -> check -> manifest -> rename into place.

Everything is written into a hidden temporary folder beside OUT_DIR and renamed at the end, so a
failure or Ctrl-C leaves no partial folder behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

from .quantize import QuantConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict


GRAPHS = ("fast", "reference")


def export_model(source: str, out_dir: str | Path, *, quant: QuantConfig | None = None, graph: str = "fast",
                 force: bool = False, eval_text: str | Path | None = None, eval_windows: int = 160,
                 log: Log = print) -> ExportResult:
    """Export `source` (hub id, local folder or random:<preset>) to an ONNX folder at `out_dir`.

    `graph="fast"` writes the op-by-op graph the engine is tuned for (any precision); `"reference"` is
    Optimum's plain export (fp32), kept to check the fast graph against. Quantized exports measure their
    quality over `eval_windows` windows of 128 tokens; 0 skips that stage.
    """
    out_dir = Path(out_dir)
    quant = quant or QuantConfig.fp32()
    if graph not in GRAPHS:
        raise Gpt2OnnxError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if graph == "reference" and quant.precision != "fp32":
        raise Gpt2OnnxError("the reference graph is fp32 only; quantized precisions use --graph fast")
    check_destination(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        manifest = _run_stages(source, work, quant, graph, (eval_text, eval_windows), log)
        replace_folder(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {out_dir} ({manifest['size_bytes'] / 1e6:.1f} MB, {manifest['precision']}, "
        f"max |Δlogit| vs PyTorch {manifest['parity']['max_abs_logit_diff']:.2e})")
    if "quality" in manifest:
        q = manifest["quality"]
        log(f"quality vs PyTorch fp32 over {q['tokens']} tokens: top-1 agreement {q['top1_agreement']:.4f}, "
            f"mean KL {q['mean_kl']:.5f}, perplexity ratio {q['perplexity_ratio']:.4f}")
    return ExportResult(out_dir, manifest)


def _run_stages(source: str, work: Path, quant: QuantConfig, graph: str, evaluation: tuple, log: Log) -> dict:
    from gpt2_onnx.engine import Engine

    from .load import load_checkpoint
    from .manifest import MANIFEST, write_manifest
    from .parity import measure_parity
    from .quality import evaluation_windows, measure_quality
    from .to_onnx import export_fast_graph, export_reference_graph

    measure = quant.precision != "fp32" and evaluation[1] > 0
    stages = _Stages(log, total=5 if measure else 4)
    with stages("load", source):
        checkpoint = load_checkpoint(source)
        quant.check_width(checkpoint.model.config.n_embd)
    max_weight_error = 0.0
    if graph == "fast":
        with stages("to-onnx", f"op-by-op fast graph, {describe(quant)}"):
            model_path, max_weight_error = export_fast_graph(checkpoint.model, work, quant)
    else:
        with stages("to-onnx", "Optimum text-generation-with-past"):
            model_path = export_reference_graph(checkpoint.model, work)
    checkpoint.model.config.save_pretrained(work)
    checkpoint.tokenizer.save_pretrained(work)
    # the engine reads the graph kind from the manifest; a provisional one lets the checks run it
    (work / MANIFEST).write_text(json.dumps({"graph": graph, "precision": quant.precision}))
    with stages("check", "onnx.checker, then parity with PyTorch"):
        _check_graph(model_path)
        parity = measure_parity(checkpoint.model, work)
    extra = {"quantization": {**asdict(quant), "max_weight_error": max_weight_error}}
    if measure:
        with stages("quality", "teacher-forced against PyTorch fp32"):
            windows, described = evaluation_windows(checkpoint.tokenizer, checkpoint.model, *evaluation)
            extra["quality"] = {"text": described, **measure_quality(checkpoint.model, Engine(work), windows)}
    with stages("manifest", "hashes and versions"):
        return write_manifest(work, source=source, source_kind=checkpoint.kind,
                              config=checkpoint.model.config.to_dict(), precision=quant.precision, graph=graph,
                              parity=parity, extra=extra)


def describe(quant: QuantConfig) -> str:
    if quant.precision == "int4":
        return (f"int4 blocks of {quant.block_size}, {'symmetric' if quant.symmetric else 'asymmetric'}, "
                f"LM head {quant.head_bits or 32}-bit")
    return quant.precision


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
