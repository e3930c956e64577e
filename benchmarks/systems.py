"""The systems compared, behind one call: run(prompt ids [B, L], new_tokens) -> when each step's tokens came.

Every system gets the same token ids and generates exactly `new_tokens` greedy tokens (EOS ignored), with
its threads pinned to the same count. `step_times[k]` is the time from the call to step k's tokens:
step 0 is the prefill (time to first token), the gaps after it are the per-token decode times.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .exports import ExportCache, folder_bytes


@dataclass
class Run:
    step_times: list[float]  # seconds from the call to each step's tokens
    tokens: np.ndarray  # [B, new_tokens]


@dataclass
class System:
    """A name, a folder, and `load` / `run` filled in by the subclass."""

    name: str
    threads: int
    folder: Path | None = None
    checkpoint: Path | None = None  # the Hugging Face folder it was converted from
    weight_bytes: int = 0  # bytes of weights read per decoded token (tables that are only gathered excluded)
    notes: dict = field(default_factory=dict)

    def load(self) -> None:
        raise NotImplementedError

    def run(self, prompts: np.ndarray, new_tokens: int) -> Run:
        raise NotImplementedError


class EngineSystem(System):
    def load(self) -> None:
        from gpt2_onnx.engine import Engine

        self.engine = Engine(self.folder, threads=self.threads)
        self.weight_bytes = onnx_weight_bytes(self.folder / "model.onnx")

    def run(self, prompts: np.ndarray, new_tokens: int) -> Run:
        from gpt2_onnx.engine import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        rows = [self.engine.new_row(list(map(int, p)), config) for p in prompts]
        start, times = time.perf_counter(), []
        for _ in self.engine.decode_steps(rows):
            times.append(time.perf_counter() - start)
        return Run(times, np.array([row.new_ids for row in rows]))


class _StepClock:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self) -> None:
        self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self.prompt_seen = True  # generate() first hands the streamer the prompt

    def end(self) -> None:
        pass


class HuggingFaceSystem(System):
    """transformers' `generate` over a PyTorch model or Optimum's ORTModelForCausalLM."""

    def run(self, prompts: np.ndarray, new_tokens: int) -> Run:
        import torch

        clock = _StepClock()
        ids = torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64))
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                                      pad_token_id=self.model.config.eos_token_id)
        return Run(clock.times, out[:, ids.shape[1]:].numpy())


class TorchSystem(HuggingFaceSystem):
    def load(self) -> None:
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(self.threads)
        self.model = GPT2LMHeadModel.from_pretrained(self.folder).eval()
        unique = {p.data_ptr(): p for p in self.model.parameters()}.values()  # the tied head counted once
        config = self.model.config
        self.weight_bytes = sum(p.numel() * p.element_size() for p in unique) - config.n_positions * config.n_embd * 4


class OptimumSystem(HuggingFaceSystem):
    def load(self) -> None:
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(self.threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        file_name = "model_quantized.onnx" if (self.folder / "model_quantized.onnx").exists() else "model.onnx"
        self.model = ORTModelForCausalLM.from_pretrained(self.folder, file_name=file_name, session_options=options,
                                                         use_io_binding=True)
        self.weight_bytes = onnx_weight_bytes(self.folder / file_name)


class CTranslate2System(System):
    def load(self) -> None:
        import ctranslate2
        from tokenizers import Tokenizer

        self.generator = ctranslate2.Generator(str(self.folder), device="cpu", compute_type="int8",
                                               intra_threads=self.threads, inter_threads=1)
        tokenizer = Tokenizer.from_file(str(self.checkpoint / "tokenizer.json"))
        self.vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        config = json.loads((self.checkpoint / "config.json").read_text())
        wpe = config["n_positions"] * config["n_embd"] * 4  # position table: one row read per token
        self.weight_bytes = (self.folder / "model.bin").stat().st_size - wpe

    def run(self, prompts: np.ndarray, new_tokens: int) -> Run:
        start, times = time.perf_counter(), []

        def on_token(step) -> bool:
            if len(times) <= step.step:
                times.append(time.perf_counter() - start)
            return False  # False: go on
        tokens = [[self.vocab[int(t)] for t in row] for row in prompts]
        results = self.generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                                include_prompt_in_result=False, callback=on_token)
        return Run(times, np.array([r.sequences_ids[0] for r in results]))


@dataclass
class LlamaCppSystem(System):
    """llama.cpp (a GGUF file in `folder`) through the suite's driver, benchmarks/llamacpp_run.cpp: the same
    prompt ids, greedy, one process kept for all runs; `llama_dir` is --llama-cpp (None: the cached build)."""

    llama_dir: Path | None = None

    def load(self) -> None:
        from .llamacpp import llama_cpp, weight_bytes

        runner = llama_cpp(self.llama_dir, log=lambda _: None).runner
        self.process = subprocess.Popen([str(runner), str(self.folder / "model.gguf"), str(self.threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f"llama.cpp driver failed to load {self.folder / 'model.gguf'} (exit {self.process.wait()})")
        self.weight_bytes = weight_bytes(self.folder / "model.gguf")

    def run(self, prompts: np.ndarray, new_tokens: int, logits: bool = False) -> Run:
        rows, length = prompts.shape  # [B, L]
        self.process.stdin.write(f"{new_tokens} {rows} {length} {int(logits)} {' '.join(map(str, prompts.ravel()))}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp driver exited ({self.process.wait()}) on a batch of {rows} x {length}")
        reply = json.loads(line)
        self.notes.update(rss_mb=reply["rss_mb"], peak_rss_mb=reply["peak_rss_mb"])
        self.first_logits = np.array(reply["logits"], dtype=np.float32)  # [vocab] row 0 after prefill, if asked
        return Run(reply["times"], np.array(reply["tokens"]))

    def close(self) -> None:
        if getattr(self, "process", None) and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


CLASSES = {"engine": EngineSystem, "pytorch": TorchSystem, "optimum": OptimumSystem, "ctranslate2": CTranslate2System,
           "llamacpp": LlamaCppSystem}
NEEDS = {"optimum": "optimum.onnxruntime", "ctranslate2": "ctranslate2", "llamacpp": "gguf"}


def make_systems(names: list[str], cache: ExportCache, threads: int,
                 llama_dir: Path | None = None) -> tuple[list[System], dict[str, str]]:
    """The systems asked for (built or taken from the cache), and for each that cannot run here, why.
    llama.cpp systems use the build in `llama_dir` (--llama-cpp), else build it once (cached)."""
    systems, skipped = [], {}
    for name in names:
        kind, _, precision = name.partition("-")
        if kind not in CLASSES:
            raise ValueError(f"unknown system {name!r}")
        if kind in NEEDS and (missing := _missing(NEEDS[kind])):
            skipped[name] = missing
            continue
        if kind == "llamacpp":
            from .llamacpp import LlamaCppUnavailable, gguf_model, llama_cpp

            try:
                model = gguf_model(cache, llama_cpp(llama_dir, log=cache.log), precision, threads)
            except LlamaCppUnavailable as why:
                skipped[name] = str(why)
                continue
            systems.append(LlamaCppSystem(name, threads, model.parent, cache.checkpoint(), llama_dir=llama_dir))
            systems[-1].notes["folder_mb"] = round(model.stat().st_size / 1e6, 1)
            continue
        folder = {"engine": lambda: cache.engine(precision), "pytorch": cache.checkpoint,
                  "optimum": lambda: cache.optimum(precision), "ctranslate2": cache.ctranslate2}[kind]()
        systems.append(CLASSES[kind](name, threads, folder, cache.checkpoint()))
        systems[-1].notes["folder_mb"] = round(folder_bytes(folder) / 1e6, 1)
    return systems, skipped


def system_from_spec(spec: dict) -> System:
    """Rebuild a system in another process (memory and cold-start probes) from its name and folders."""
    kind = spec["name"].partition("-")[0]
    system = CLASSES[kind](spec["name"], spec["threads"], Path(spec["folder"]), Path(spec["checkpoint"]))
    if kind == "llamacpp" and spec.get("llama_cpp"):
        system.llama_dir = Path(spec["llama_cpp"])
    return system


def _missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module.split('.')[0]} is not installed (pip install it to compare)"


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers a one-row decode step reads: all but tables (and their scales) that are only
    gathered from (one row). Of an If it follows the then-branch: the exporter's only If is the shortlisted LM head's
    (export/lm_head.py), whose then-branch is the few-rows path, reading the 4-bit table and gathering
    from the 8-bit one."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}

    def walk(graph) -> None:
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            if node.op_type == "If":
                walk(next(a.g for a in node.attribute if a.name == "then_branch"))
    walk(model.graph)

    def uses(name: str) -> set[str]:  # the ops that read a tensor, looking through Reshapes (a gathered table's scales)
        ops = set()
        for node in consumers.get(name, []):
            ops |= uses(node.output[0]) if node.op_type == "Reshape" and node.input[0] == name else {node.op_type}
        return ops
    total = 0
    for tensor in model.graph.initializer:
        if uses(tensor.name) <= {"Gather", "GatherBlockQuantized"}:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total
