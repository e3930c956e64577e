"""The export's side of the manifest (engine/manifest.py declares it): check that the written graph has
the IO the manifest promises, then complete the manifest with hashes, sizes, versions and the machine."""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import onnx

from gpt2_onnx.engine.manifest import MODEL_FILE, Manifest, file_table

PACKAGES = ("gpt2-onnx", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy",
            "tokenizers")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_io(folder: Path, manifest: Manifest) -> None:
    """The graph's inputs and outputs are the ones the manifest declares (the engine binds by these names)."""
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    inputs, outputs = {v.name for v in graph.input}, {v.name for v in graph.output}
    caches = manifest.io.cache_names(manifest.n_layer)
    missing = ({*manifest.io.inputs, *(past for past, _ in caches)} - inputs) | \
              ({manifest.io.logits, *(present for _, present in caches)} - outputs)
    assert not missing, f"the graph lacks the manifest's IO {sorted(missing)}"


def finish(manifest: Manifest, folder: Path) -> Manifest:
    """The manifest with every file's hash and size, package versions and the machine it was made on."""
    hashes, sizes = file_table(folder)
    return replace(manifest, files=hashes, sizes=sizes, versions=package_versions(),
                   machine={"python": platform.python_version(), "platform": platform.platform()},
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
