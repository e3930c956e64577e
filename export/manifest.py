"""`gpt2_onnx.json`: what an export folder holds and how well it matches PyTorch.

The folder describes itself (as onnxruntime-genai's genai_config.json does): source, config, precision,
graph inputs/outputs, package versions, sha256 of every file and the parity measured at export.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import onnx

from gpt2_onnx.engine.session import MANIFEST, MODEL_FILE
PACKAGES = ("gpt2-onnx", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy",
            "tokenizers")
HASH_CHUNK = 16 * 1024 * 1024


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_files(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def graph_io(model_path: Path) -> dict[str, list[dict]]:
    model = onnx.load(str(model_path), load_external_data=False)

    def describe(values) -> list[dict]:
        return [{"name": v.name, "type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def write_manifest(folder: Path, *, source: str, source_kind: str, config: dict, precision: str, graph: str,
                   parity: dict, extra: dict | None = None) -> dict:
    manifest = {
        "format": "gpt2-onnx/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "source_kind": source_kind,
        "graph": graph,
        "precision": precision,
        "config": {k: config[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                                          "eos_token_id", "bos_token_id", "layer_norm_epsilon")},
        "io": graph_io(folder / MODEL_FILE),
        "parity": parity,
        **(extra or {}),
        "versions": package_versions(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "files": sha256_files(folder),
        "size_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
