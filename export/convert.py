"""Export as one template: load -> to-onnx -> check -> quality -> manifest -> rename into place.

Everything is written into a hidden temporary folder beside OUT_DIR and renamed at the end, so a
failure, Ctrl-C or SIGTERM leaves no partial folder behind (a SIGKILL's leftovers are removed by the
next export into the same parent). `--force` replaces only a previous export, never a user's folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gpt2_onnx.engine.manifest import BATCHED_FOLDER, GRAPHS, MANIFEST, MODEL_FILE, Manifest
from gpt2_onnx.errors import Gpt2OnnxError

from .batched import add_batched_graph, wants_batched_graph
from .quantize import QuantConfig

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: say so in one line, not a traceback

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: Manifest


def export_model(source: str, out_dir: str | Path, *, quant: QuantConfig | None = None, graph: str = "fast",
                 force: bool = False, eval_text: str | Path | None = None, eval_windows: int | None = None,
                 with_attention: bool = False, log: Log = print) -> ExportResult:
    """Export `source` (hub id, local folder or random:<preset>) to an ONNX folder at `out_dir`.

    `graph="fast"` writes the op-by-op graph the engine is tuned for (any precision); `"reference"` is
    Optimum's plain export (fp32), kept to check the fast graph against. Quantized exports measure their
    quality against PyTorch (`eval_windows` windows of the evaluation text; 0 skips that stage).
    `with_attention` also writes the inspection graph `attention.onnx` (export/attention.py).
    """
    out_dir = Path(out_dir)
    quant = quant or QuantConfig.fp32()
    if graph not in GRAPHS:
        raise Gpt2OnnxError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if graph == "reference" and quant.precision != "fp32":
        raise Gpt2OnnxError("the reference graph is fp32 only; quantized precisions use --graph fast")
    if graph == "reference" and quant.kv_cache != "float32":
        raise Gpt2OnnxError("the reference graph keeps a float32 KV cache; --kv-cache int8 needs --graph fast")
    if eval_text is not None and not Path(eval_text).is_file():
        raise Gpt2OnnxError(f"--eval-text {eval_text} is not a readable file")
    check_destination(source, out_dir, force)
    remove_stale_work(out_dir, log)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    except OSError as exc:
        raise Gpt2OnnxError(f"cannot write beside {out_dir} ({exc.strerror}); choose a writable OUT_DIR") from None
    work.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        with _sigterm_as_interrupt():
            manifest = _run_stages(source, work, quant, graph, (eval_text, eval_windows), log, with_attention)
            replace_folder(work, out_dir)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise Gpt2OnnxError(f"the disk under {out_dir.parent} filled up while the export was written "
                                f"({exc.strerror}); nothing was kept: free space there or choose another OUT_DIR") from None
        raise
    log(f"wrote {out_dir} ({manifest.size_bytes / 1e6:.1f} MB, {manifest.precision}, "
        f"max |Δlogit| vs PyTorch {manifest.parity['max_abs_logit_diff']:.2e}, greedy tokens "
        f"{'match' if manifest.parity['greedy_tokens_match'] else 'differ'})")
    if manifest.quality:
        q = manifest.quality
        log(f"quality vs PyTorch fp32 over {q['tokens']} tokens: top-1 agreement {q['top1_agreement']:.4f}, "
            f"mean KL {q['mean_kl']:.5f}, perplexity ratio {q['perplexity_ratio']:.4f}")
    if manifest.batched:
        b = manifest.batched
        quality = f"; its top-1 agreement {b['quality']['top1_agreement']:.4f}" if b.get("quality") else ""
        log(f"batched graph ({b['precision']}, {b['folder']}/) runs passes of {b['min_tokens']}+ tokens, "
            f"measured here{quality}")
        if b["min_tokens"] == 1:
            log("note: the int8 graph was faster at every length on this machine, so every pass runs on it; "
                "--precision int8 would give the same speed in a smaller folder")
    return ExportResult(out_dir, manifest)


def _run_stages(source: str, work: Path, quant: QuantConfig, graph: str, evaluation: tuple, log: Log,
                with_attention: bool = False) -> Manifest:
    from gpt2_onnx.engine import Engine

    from .kv_cache import calibrate_kv_scales
    from .load import load_checkpoint
    from .manifest import check_io, finish
    from .parity import measure_parity
    from .quality import evaluation_windows, measure_quality
    from .to_onnx import export_fast_graph, export_reference_graph

    measure = (quant.precision != "fp32" or quant.kv_cache != "float32") and evaluation[1] != 0
    with_batched = graph == "fast" and wants_batched_graph(quant)
    stages = _Stages(log, total=4 + measure + with_attention + with_batched)
    with stages("load", source):
        checkpoint = load_checkpoint(source)
        quant = quant.for_width(checkpoint.model.config.n_embd)
    max_weight_error, kv_scales = 0.0, None
    if graph == "fast":
        with stages("to-onnx", f"op-by-op fast graph, {describe(quant)}"):
            if quant.kv_cache == "int8":
                kv_scales = calibrate_kv_scales(checkpoint.model, checkpoint.tokenizer)
            _, max_weight_error = export_fast_graph(checkpoint.model, work, quant, kv_scales)
    else:
        with stages("to-onnx", "Optimum text-generation-with-past"):
            export_reference_graph(checkpoint.model, work)
    if with_attention:  # recorded in the manifest's files like every file of the folder
        from .attention import write_attention_graph

        with stages("attention", "inspection graph attention.onnx, fp32, standard ops"):
            write_attention_graph(checkpoint.model, work)
    checkpoint.model.config.save_pretrained(work)
    checkpoint.tokenizer.save_pretrained(work)
    manifest = Manifest.for_graph(graph, quant.precision, checkpoint.model.config.to_dict(), quant.kv_cache,
                                  source=source,
                                  source_kind=checkpoint.kind,
                                  quantization={**asdict(quant), "head_shortlist": quant.shortlist,
                                                "max_weight_error": max_weight_error})
    if with_batched:
        with stages("batched", "int8 graph for prompts and wide batches, then timed against the main graph"):
            manifest = replace(manifest, batched=add_batched_graph(checkpoint.model, work, quant, manifest, log,
                                                                   kv_scales))
    batched = manifest.batched
    with stages("check", "onnx.checker, then parity with PyTorch"):
        for folder in [work] + ([work / BATCHED_FOLDER] if batched else []):
            _check_graph(folder / MODEL_FILE)
            check_io(folder, manifest)
        # each graph on its own: the main one for every pass, then the batched one for every pass
        engine = Engine(work, manifest=manifest, huge_pages=False)  # parity does not depend on page size
        engines = {"": engine.batched_from(None), **({"batched": engine.batched_from(1)} if batched else {})}
        parity = {key: measure_parity(checkpoint.model, each) for key, each in engines.items()}
        manifest = replace(manifest, parity=parity[""])
        if batched:
            manifest = replace(manifest, batched={**manifest.batched, "parity": parity["batched"]})
    if measure:
        with stages("quality", "teacher-forced against PyTorch fp32"):
            text, windows = evaluation
            windows_args = () if windows is None else (windows,)
            ids, described = evaluation_windows(checkpoint.tokenizer, checkpoint.model, text, *windows_args)
            quality = {key: {"text": described, **measure_quality(checkpoint.model, each, ids)}
                       for key, each in engines.items()}
            manifest = replace(manifest, quality=quality[""])
            if batched:
                manifest = replace(manifest, batched={**manifest.batched, "quality": quality["batched"]})
    with stages("manifest", "hashes and versions"):
        manifest = finish(manifest, work)
        manifest.write(work)
        return manifest


def describe(quant: QuantConfig) -> str:
    if quant.precision == "int4":
        text = (f"int4 blocks of {quant.block_size}, {'symmetric' if quant.symmetric else 'asymmetric'}, "
                f"LM head {quant.head_bits or 32}-bit")
    else:
        text = quant.precision
    return text + (", int8 KV cache" if quant.kv_cache == "int8" else "")


def _check_graph(model_path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(model_path))  # path form: works past 2 GB with external data


def check_destination(source: str, out_dir: Path, force: bool) -> None:
    """Refuse to write where it would destroy what the user did not ask to replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise Gpt2OnnxError(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    source_path = Path(source).expanduser()
    if source_path.exists():
        src, out = source_path.resolve(), out_dir.resolve()
        if out == src or out in src.parents:
            raise Gpt2OnnxError(f"OUT_DIR {out_dir} is the source checkpoint or holds it; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise Gpt2OnnxError(f"{out_dir} exists and is not empty; pass --force to replace a previous export")
        if not (out_dir / MANIFEST).is_file():
            raise Gpt2OnnxError(f"{out_dir} is not a gpt2-onnx export (it has no {MANIFEST}); --force replaces only "
                                "a previous export: choose another OUT_DIR or empty it yourself")


def remove_stale_work(out_dir: Path, log: Log) -> None:
    """Temporary folders of exports killed before they could clean up (their process is gone)."""
    if not out_dir.parent.is_dir():
        return
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = stale.name.removeprefix(f".{out_dir.name}.partial-").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            log(f"removing {stale}: left by an export (pid {pid}) that was killed")
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`. A previous `target` is kept aside until the new one is in place, and put
    back if that fails, so at every moment one of them is at `target` or recoverable beside it."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a supervisor, `kill`) cleans up like Ctrl-C instead of leaving the temp folder behind."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
