"""`gpt2_onnx.json`, the contract between an export folder and the engine: written once by the export,
read by the engine, which takes the graph kind, its IO names and the KV cache's type from it.

The folder describes itself (as onnxruntime-genai's genai_config.json does): what it was exported from,
the model's shape, the graph and its IO, the precision and recipe, the parity and quality measured at
export, package versions, and the sha256 and size of every file. A plain `optimum-cli export onnx
--task text-generation-with-past` folder has no manifest; one is synthesised from its config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

MANIFEST = "gpt2_onnx.json"
HASH_CHUNK = 16 * 1024 * 1024
MODEL_FILE = "model.onnx"
BATCHED_FOLDER = "batched"  # the optional batched graph: <export>/batched/model.onnx (see `Manifest.batched`)
FORMAT = "gpt2-onnx/2"

# Each choice is declared here once; the export, the CLI, the engine and the docs read these.
PRECISIONS = ("fp32", "int8", "int4", "fp16")  # fp16 is for the CUDA provider
GRAPHS = ("fast", "reference")  # fast: op-by-op graph on a shared KV buffer; reference: Optimum's export
KV_DTYPES = ("float32", "float16", "int8")
KV_CACHES = ("float32", "int8")  # export --kv-cache: the cache a float32 graph keeps (fp16 graphs keep fp16)
INT8_KERNELS = ("DynamicQuantizeMatMul", "MatMulNBits")  # int8 blocks: per-channel weights, or 8-bit blocks


@dataclass(frozen=True)
class GraphIO:
    """The graph's inputs and outputs, and how its KV cache is laid out."""

    inputs: tuple[str, ...]  # non-cache inputs, in the graph's order
    past: str = "past_key_values.{layer}.{kind}"  # kind: key | value
    present: str = "present.{layer}.{kind}"
    logits: str = "logits"
    kv_dtype: str = "float32"
    # fast: one buffer [rows, heads, max_length, head_dim] bound as both past and present, written in place;
    # reference: past [batch, heads, length, head_dim] in, present = past + the new positions out
    kv_layout: str = "shared-buffer"

    def cache_names(self, n_layer: int) -> list[tuple[str, str]]:
        """(past, present) names, layer by layer, key before value."""
        return [(self.past.format(layer=i, kind=kind), self.present.format(layer=i, kind=kind))
                for i in range(n_layer) for kind in ("key", "value")]

    def require(self, *names: str) -> None:
        missing = [name for name in names if name not in self.inputs]
        if missing:
            raise Gpt2OnnxError(f"the graph has no input(s) {', '.join(missing)}: it was written by an older "
                                "gpt2-onnx; re-export the model")


FAST_INPUTS = ("input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_positions")
REFERENCE_INPUTS = ("input_ids", "attention_mask", "position_ids")
GRAPH_IO = {"fast": GraphIO(FAST_INPUTS, kv_layout="shared-buffer"),
            "reference": GraphIO(REFERENCE_INPUTS, kv_layout="concat")}


@dataclass(frozen=True)
class Manifest:
    graph: str
    precision: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int  # the context window: prompt + new tokens must fit
    vocab_size: int
    eos_token_id: int
    io: GraphIO
    bos_token_id: int | None = None
    layer_norm_epsilon: float = 1e-5
    source: str | None = None  # what it was exported from
    source_kind: str | None = None  # "random", "local" or "hub"
    quantization: dict = field(default_factory=dict)  # the recipe and the quantizer's max weight error
    parity: dict = field(default_factory=dict)  # logits against PyTorch at export
    quality: dict | None = None  # top-1 / KL / perplexity against PyTorch fp32 (quantized exports)
    # A second graph over the same KV cache for passes of many tokens (prefills, wide decode steps), where
    # another kernel is faster than the main graph's: {"folder", "precision", "min_tokens", parity, quality,
    # the timings that chose min_tokens}; empty when the export has none
    batched: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # path -> bytes (checked at every load: cheap)
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    created: str | None = None
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise Gpt2OnnxError(f"unknown graph {self.graph!r} in {MANIFEST}; re-export the model")
        if self.precision not in PRECISIONS:
            raise Gpt2OnnxError(f"unknown precision {self.precision!r} in {MANIFEST}; re-export the model")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def size_bytes(self) -> int:
        return sum(self.sizes.values())

    @classmethod
    def for_graph(cls, graph: str, precision: str, config: dict, kv_cache: str = "float32", **extra) -> Manifest:
        """A manifest for a model of Hugging Face `config` (a GPT2Config dict) and a graph kind."""
        eos = config.get("eos_token_id", 50256)
        kv_dtype = "float16" if precision == "fp16" else kv_cache
        return cls(graph=graph, precision=precision, n_layer=config["n_layer"], n_head=config["n_head"],
                   n_embd=config["n_embd"], n_positions=config["n_positions"], vocab_size=config["vocab_size"],
                   eos_token_id=eos[0] if isinstance(eos, list) else eos, bos_token_id=config.get("bos_token_id"),
                   layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
                   io=replace(GRAPH_IO[graph], kv_dtype=kv_dtype), **extra)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The folder's manifest, or one synthesised from config.json for a plain Optimum export."""
        path = folder / MANIFEST
        if not path.exists():
            config = _read_json(folder / "config.json")
            _check_gpt2(config, folder)
            return cls.for_graph("reference", "fp32", config, source_kind="optimum")
        data = _read_json(path)
        if data.get("format") != FORMAT:
            raise Gpt2OnnxError(f"{path} is in format {data.get('format')!r}, not {FORMAT!r}: the folder was "
                                "written by another gpt2-onnx version; re-export the model")
        try:
            data["io"] = GraphIO(**{**data["io"], "inputs": tuple(data["io"]["inputs"])})
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise Gpt2OnnxError(f"{path} is incomplete ({exc}); re-export the model") from None

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def check_files(self, folder: Path) -> None:
        """The graph and its weights are there with their sizes: cheap, and catches a truncated copy.
        (config.json and the tokenizer may be edited by hand; `gpt2-onnx verify` checks every hash.)"""
        for name, size in self.sizes.items():
            if not name.removeprefix(f"{BATCHED_FOLDER}/").startswith(MODEL_FILE):
                continue
            path = folder / name
            if not path.is_file():
                raise Gpt2OnnxError(f"{path} is missing; re-export the model")
            if path.stat().st_size != size:
                raise Gpt2OnnxError(f"{path} has {path.stat().st_size} bytes, the manifest says {size}: the "
                                    "file is truncated or was changed; re-export the model")


    def verify(self, folder: Path) -> list[str]:
        """Every file's sha256 against the manifest (reads every byte: seconds per GB); the problems found."""
        if not self.files:
            return [f"{folder / MANIFEST} lists no files to check (not a gpt2-onnx export?)"]
        problems = []
        for name, digest in self.files.items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"{path} differs from the export (sha256 mismatch)")
        return problems


def file_table(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """sha256 and size of every file in the folder but the manifest itself."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    names = [p.relative_to(folder).as_posix() for p in paths]
    return ({n: sha256_file(p) for n, p in zip(names, paths)}, {n: p.stat().st_size for n, p in zip(names, paths)})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise Gpt2OnnxError(f"{path} is missing; is {path.parent} a folder written by `gpt2-onnx export`?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gpt2OnnxError(f"{path} is corrupt ({exc}); re-export the model") from None


def _check_gpt2(config: dict, folder: Path) -> None:
    if config.get("model_type") != "gpt2":
        raise Gpt2OnnxError(f"{folder} holds a {config.get('model_type')!r} model; only GPT-2 is supported")
