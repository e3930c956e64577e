"""Initializers streamed to one external data file as the graph is built, never all in memory at once.

`onnx.save_model(..., save_as_external_data=True)` needs the whole model in memory first, and building
that model copies every initializer twice more (`make_graph`, `make_model`): three copies of the weights
beside the torch model's, which is what ran gpt2-xl (6.2 GB of weights) out of 24 GiB. Here each tensor
is written to `model.onnx.data` the moment the builder makes it, and the graph keeps only its name,
offset and length, as the ONNX external-data convention describes.

Tensors of 1 MiB and more start at a multiple of 64 KiB (4 KiB pages on Linux, 64 KiB allocation
granularity on Windows): onnxruntime maps such tensors into memory on the CPU instead of reading a copy.
Tensors under 1 KiB (shapes, scalars) stay inside `model.onnx`.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np
import onnx
from onnx import helper, numpy_helper

EXTERNAL_DATA_FILE = "model.onnx.data"
INLINE_BELOW = 1024  # bytes: smaller tensors are stored inside the graph
ALIGN_FROM = 1024 * 1024  # bytes: tensors this large start on an ALIGN boundary
ALIGN = 64 * 1024


class ExternalDataWriter:
    """`writer.tensor(array, name)` -> a TensorProto whose bytes are already in the data file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / EXTERNAL_DATA_FILE
        self.file = self.path.open("wb")
        self.size = 0  # bytes written, padding included

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        array = np.ascontiguousarray(array) if array.ndim else array
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        if array.nbytes >= ALIGN_FROM and self.size % ALIGN:
            padding = ALIGN - self.size % ALIGN
            self.file.write(bytes(padding))
            self.size += padding
        offset = self.size
        self.file.write(memoryview(array).cast("B"))  # the array's own buffer: no bytes copy
        self.size += array.nbytes
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", EXTERNAL_DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def save_embedded(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """Write `model` as one file with every external tensor's bytes inside it, then delete the data file.

    For models under protobuf's 2 GiB. Loading the data back into the graph and serializing it would hold
    the weights twice (the graph, then its serialized bytes); instead the file is written in protobuf's
    wire format piece by piece: the graph without those tensors, then each tensor as one more
    `initializer` entry whose `raw_data` is copied from the data file (fields may come in any order,
    and repeated fields append).
    """
    graph = model.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    headers = []
    for tensor in external:
        info = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
        header = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        headers.append((header.SerializeToString(), info.get("offset", 0), info["length"]))
        graph.initializer.remove(tensor)
    entries = [_field(9, length) for _, _, length in headers]  # raw_data's tag and length
    tensor_sizes = [len(h) + len(e) + length for (h, _, length), e in zip(headers, entries)]
    graph_bytes = graph.SerializeToString()
    graph_size = len(graph_bytes) + sum(len(_field(5, n)) + n for n in tensor_sizes)
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    data_path = Path(folder) / EXTERNAL_DATA_FILE
    with data_path.open("rb") as data, Path(path).open("wb") as out:
        out.write(head.SerializeToString() + _field(7, graph_size) + graph_bytes)
        for (header, offset, length), entry, size in zip(headers, entries, tensor_sizes):
            out.write(_field(5, size) + header + entry)
            data.seek(offset)
            out.write(data.read(length))
    data_path.unlink()


def _field(number: int, length: int) -> bytes:
    """The tag and length that open a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
