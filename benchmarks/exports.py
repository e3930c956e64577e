"""Every model the suite runs, built once and cached: a folder per (source, artifact, package versions).

The cache lives in $GPT2_ONNX_CACHE (default ~/.cache/gpt2-onnx/bench). Each entry is written to a temp
folder and renamed into place, so an interrupted run leaves nothing half-built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpt2_onnx.export.manifest import package_versions
from gpt2_onnx.export.quantize import cpu_flags

PACKAGES = ("gpt2-onnx", "torch", "transformers", "onnxruntime", "optimum", "optimum-onnx", "ctranslate2")


def versions() -> dict[str, str | None]:
    return package_versions(PACKAGES)


class ExportCache:
    def __init__(self, source: str, root: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.source, self.log = source, log
        self.root = Path(root or os.environ.get("GPT2_ONNX_CACHE", Path.home() / ".cache" / "gpt2-onnx" / "bench"))

    def folder(self, artifact: str, build: Callable[[Path], None]) -> Path:
        """The cached folder for `artifact`, built by `build(tmp_folder)` when missing."""
        key = json.dumps({"source": self.source, "stamp": _source_stamp(self.source), "artifact": artifact,
                          "versions": versions()}, sort_keys=True)
        name = f"{artifact}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        target = self.root / _slug(self.source) / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"building {artifact} for {self.source} (cached in {target.parent})")
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(work / "out")
            (work / "out" / "cache-key.json").write_text(key)
            (work / "out").rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    def checkpoint(self) -> Path:
        """The source as a Hugging Face folder (what Optimum and CTranslate2 convert from)."""
        def build(out: Path) -> None:
            from gpt2_onnx.export.load import load_checkpoint

            loaded = load_checkpoint(self.source)
            loaded.model.save_pretrained(out)
            loaded.tokenizer.save_pretrained(out)
        return self.folder("checkpoint", build)

    def engine(self, precision: str) -> Path:
        from gpt2_onnx.export import QuantConfig, export_model

        quant = getattr(QuantConfig, precision)()  # each precision's default recipe (fp16 included)

        def build(out: Path) -> None:
            # quality is measured by the suite's own parity stage, on its own text
            export_model(str(self.checkpoint()), out, quant=quant, eval_windows=0, log=lambda _: None)
        # a new default recipe or a changed graph builder, a new export
        recipe = hashlib.sha256((repr(quant) + _export_code_stamp()).encode()).hexdigest()[:8]
        return self.folder(f"engine-{precision}-{recipe}", build)

    def optimum(self, precision: str) -> Path:
        def build(out: Path) -> None:
            from optimum.onnxruntime import ORTModelForCausalLM

            ORTModelForCausalLM.from_pretrained(self.checkpoint(), export=True, use_cache=True).save_pretrained(out)
            _copy_tokenizer(self.checkpoint(), out)

        fp32 = self.folder("optimum-fp32", build)
        if precision == "fp32":
            return fp32

        def quantize(out: Path) -> None:
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            make = AutoQuantizationConfig.avx512_vnni if "avx512_vnni" in cpu_flags() else AutoQuantizationConfig.avx2
            ORTQuantizer.from_pretrained(fp32, file_name="model.onnx").quantize(
                save_dir=out, quantization_config=make(is_static=False, per_channel=True))
            _copy_tokenizer(fp32, out)
        return self.folder("optimum-int8", quantize)

    def ctranslate2(self) -> Path:
        def build(out: Path) -> None:
            import ctranslate2

            ctranslate2.converters.TransformersConverter(str(self.checkpoint())).convert(str(out), quantization="int8")
        return self.folder("ctranslate2-int8", build)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "special_tokens_map.json"):
        if (source / name).exists() and not (target / name).exists():
            shutil.copy(source / name, target / name)


def _export_code_stamp() -> str:
    """The exporter's own source: an engine export made by other code is another artifact."""
    import gpt2_onnx.export as package

    digest = hashlib.sha256()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _source_stamp(source: str) -> str | None:
    """A local checkpoint's weights may change under the same path: key on their size and time."""
    path = Path(source)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.iterdir() if f.is_file())
    return hashlib.sha256(repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()).hexdigest()


def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in source.strip("/"))[-80:]
