"""llama.cpp for the suite: its tools built (or found), and the checkpoint as GGUF at each precision.

`llama_cpp(directory)` uses an existing build (`gpt2-onnx bench --llama-cpp DIR`), else builds llama.cpp's
`llama-bench`, `llama-batched-bench` and `llama-quantize` once from the llama.cpp that the llama-cpp-python
source distribution vendors (`pip download --no-binary :all: llama-cpp-python==VERSION`; CMake, native CPU
flags, no network libraries), cached in $GPT2_ONNX_CACHE/llama.cpp (default ~/.cache/gpt2-onnx/llama.cpp).
Beside the tools it compiles `llamacpp_run.cpp`, the small driver through which the suite times llama.cpp
on its own prompt ids and reads its greedy tokens. Anything that stops this raises `LlamaCppUnavailable`,
whose message is the reason the suite prints beside the skipped system.

`gguf_model(cache, llama, precision)`: the suite's checkpoint converted to GGUF f32 (gguf_convert.py), then
quantized by llama-quantize to Q8_0, Q4_0 or Q4_K_M; each file cached like the other exports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

from .exports import ExportCache

VERSION = "0.3.36"  # the llama-cpp-python release whose vendor/llama.cpp is built
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
PRECISIONS = {"f32": None, "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}  # suite name -> llama-quantize type
RUNNER_SOURCE = Path(__file__).with_name("llamacpp_run.cpp")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")


class LlamaCppUnavailable(Gpt2OnnxError):
    """llama.cpp cannot be built or found here; the message says why and what to do."""


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: its tools, and the suite's driver compiled against it."""

    bin_dir: Path  # llama-bench, llama-batched-bench, llama-quantize
    runner: Path  # gpt2-onnx-llama-run (llamacpp_run.cpp)
    version: str  # names the cached quantized files

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def cache_root() -> Path:
    env = os.environ.get("GPT2_ONNX_CACHE")
    return Path(env) / "llama.cpp" if env else Path.home() / ".cache" / "gpt2-onnx" / "llama.cpp"


def llama_cpp(directory: Path | None = None, root: Path | None = None,
              log: Callable[[str], None] = print) -> LlamaCpp:
    """The build in `directory` (a build or install folder, or a source tree with build/), else the cached
    build of VERSION, built on first use (minutes on 2 cores)."""
    root = Path(root or cache_root())
    if directory is not None:
        return _existing(Path(directory).expanduser().resolve(), root, log)
    source, build = root / VERSION / "source", root / VERSION / "build"
    with _locked(root / f"{VERSION}.lock"):
        if not (build / ".complete").exists():
            _build(root / VERSION, log)
        runner = _runner(root, [source / "include", source / "ggml" / "include"], build / "bin", log)
    return LlamaCpp(build / "bin", runner, VERSION)


def _existing(directory: Path, root: Path, log: Callable[[str], None]) -> LlamaCpp:
    bins = [d for d in (directory / "bin", directory / "build" / "bin", directory) if (d / "llama-bench").exists()]
    if not bins:
        raise LlamaCppUnavailable(f"no llama-bench in {directory} (looked in bin/, build/bin/ and the folder "
                                  f"itself): pass a llama.cpp build folder to --llama-cpp, or leave it out to build one")
    bin_dir = bins[0]
    if missing := [t for t in TOOLS if not (bin_dir / t).exists()]:
        raise LlamaCppUnavailable(f"{bin_dir} lacks {', '.join(missing)}: build those targets too "
                                  f"(cmake --build build --target {' '.join(TOOLS)})")
    libs = [d for d in (bin_dir, directory / "lib", directory / "lib64", directory / "build" / "bin")
            if (d / "libllama.so").exists()]
    bases = [directory, directory.parent, bin_dir.parent.parent, *_cmake_sources(directory, bin_dir)]
    includes = [d for base in bases for d in (base / "include", base / "ggml" / "include")
                if (d / "llama.h").exists() or (d / "ggml.h").exists()]
    if not libs or not any((d / "llama.h").exists() for d in includes):
        raise LlamaCppUnavailable(f"{directory} has the tools but not libllama.so and include/llama.h, which the "
                                  "suite's driver links against: pass a shared-library build (the default) or its source tree")
    runner = _runner(root, includes, libs[0], log)
    stamp = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True).stderr
    return LlamaCpp(bin_dir, runner, "dir-" + hashlib.sha256((str(bin_dir) + stamp).encode()).hexdigest()[:10])


def _cmake_sources(*folders: Path) -> list[Path]:
    """The source tree a CMake build folder was configured from (CMakeCache.txt's CMAKE_HOME_DIRECTORY)."""
    found = []
    for folder in folders:
        for cache in (folder / "CMakeCache.txt", folder.parent / "CMakeCache.txt", folder / "build" / "CMakeCache.txt"):
            if cache.exists():
                found += [Path(line.split("=", 1)[1].strip()) for line in cache.read_text(errors="replace").splitlines()
                          if line.startswith("CMAKE_HOME_DIRECTORY:")]
    return found


def _build(folder: Path, log: Callable[[str], None]) -> None:
    """Download the source distribution, unpack its vendor/llama.cpp, configure and build TOOLS."""
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise LlamaCppUnavailable(f"no {program} on PATH: install cmake and a C++ compiler to build llama.cpp, "
                                      "or pass an existing build with --llama-cpp DIR")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "source"
    if not (source / "CMakeLists.txt").exists():
        _unpack(_download(folder), source)
    log(f"building llama.cpp {VERSION} ({', '.join(TOOLS)}) in {folder / 'build'}: minutes, once")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    steps = [["cmake", "-S", str(source), "-B", str(folder / "build"), *generator, *CMAKE_FLAGS],
             ["cmake", "--build", str(folder / "build"), "-j", jobs, "--target", *TOOLS]]
    with open(folder / "build.log", "w") as out:
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise LlamaCppUnavailable(f"building llama.cpp failed ({' '.join(step[:2])}); see {folder / 'build.log'}, "
                                          "or pass an existing build with --llama-cpp DIR")
    (folder / "build" / ".complete").write_text(" ".join(TOOLS))


def _download(folder: Path) -> Path:
    archive = folder / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.exists():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               f"llama-cpp-python=={VERSION}", "-d", str(folder)], capture_output=True, text=True)
        if done.returncode != 0 or not archive.exists():
            why = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise LlamaCppUnavailable(f"cannot download the llama-cpp-python {VERSION} source ({why}): "
                                      "pass an existing llama.cpp build with --llama-cpp DIR")
    return archive


def _unpack(archive: Path, source: Path) -> None:
    """vendor/llama.cpp out of the archive, into `source` (through a temp folder: never half-unpacked)."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(tmp, members=members, filter="data")
        Path(tmp, prefix).rename(source)


def _runner(root: Path, includes: list[Path], lib_dir: Path, log: Callable[[str], None]) -> Path:
    """The driver compiled against this build, cached by its source and the library it links."""
    key = hashlib.sha256(RUNNER_SOURCE.read_bytes() + str(lib_dir).encode()).hexdigest()[:12]
    runner = root / "runners" / key / "gpt2-onnx-llama-run"
    if runner.exists():
        return runner
    runner.parent.mkdir(parents=True, exist_ok=True)
    log(f"compiling {RUNNER_SOURCE.name} against {lib_dir}")
    libs = ["-lllama"] + [f"-l{n}" for n in ("ggml", "ggml-base") if (lib_dir / f"lib{n}.so").exists()]
    tmp = runner.with_suffix(".tmp")
    done = subprocess.run(["c++", "-O2", "-std=c++17", str(RUNNER_SOURCE), *[f"-I{d}" for d in includes],
                           f"-L{lib_dir}", *libs, f"-Wl,-rpath,{lib_dir}", "-o", str(tmp)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise LlamaCppUnavailable(f"compiling {RUNNER_SOURCE.name} against {lib_dir} failed: "
                                  f"{(done.stderr.strip().splitlines() or ['?'])[0]}")
    tmp.rename(runner)
    return runner


@contextmanager
def _locked(path: Path):
    """One build at a time, across processes (two suites started together share one build)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def gguf_model(cache: ExportCache, llama: LlamaCpp, precision: str, threads: int = 2) -> Path:
    """The suite's checkpoint as a GGUF file at `precision` (f32, q8_0, q4_0, q4_k_m), built once and cached."""
    if precision not in PRECISIONS:
        raise Gpt2OnnxError(f"unknown llama.cpp precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    from importlib.metadata import version

    from .gguf_convert import convert_to_gguf

    def convert(out: Path) -> None:
        _describe(convert_to_gguf(cache.checkpoint(), _made(out) / "model.gguf"))

    f32 = cache.folder(f"llamacpp-f32-gguf{version('gguf')}", convert) / "model.gguf"
    if precision == "f32":
        return f32

    def quantize(out: Path) -> None:
        cmd = [str(llama.tool("llama-quantize")), str(f32), str(_made(out) / "model.gguf"), PRECISIONS[precision],
               str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise Gpt2OnnxError(f"llama-quantize to {PRECISIONS[precision]} failed: "
                                f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        (out / "quantize.log").write_text(" ".join(cmd) + "\n" + done.stdout + done.stderr)
        _describe(out / "model.gguf")
    return cache.folder(f"llamacpp-{precision}-{llama.version}", quantize) / "model.gguf"


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def weight_bytes(model: Path) -> int:
    """`gguf_weight_bytes` of a cached model, from the weights.json beside it (written when the model was made,
    or now): reading a GGUF header in Python takes seconds (its 50,257 token strings), which the cold start
    of llama.cpp should not be charged."""
    described = model.with_name("weights.json")
    if not described.exists():
        _describe(model)
    return json.loads(described.read_text())["weight_bytes"]


def _describe(model: Path) -> None:
    model.with_name("weights.json").write_text(json.dumps({"weight_bytes": gguf_weight_bytes(model)}))


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors a decode step reads: all but the position table, which is only gathered from
    (GPT-2's head is tied: `token_embd` is read whole by the output projection, so it counts)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "position_embd.weight")
