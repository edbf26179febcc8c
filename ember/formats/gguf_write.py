"""Writing GGUF files that derive from another one, with `gguf.GGUFWriter`: the metadata copied
key by key (`copy_fields`), the tensors written one at a time (`write_streamed`), so a copy of a
model never holds more than one of its tensors in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def copy_fields(reader, writer, keep: Callable[[str], bool] = lambda name: True) -> None:
    """The metadata keys of a `gguf.GGUFReader` that `keep` accepts, into `writer` with their
    types (the container's own GGUF.* keys and the architecture, which the writer sets, aside)."""
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or not keep(name):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                value = [field.parts[i][0].item() for i in field.data]
            writer.add_key_value(name, value, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(name, bytes(field.parts[-1]).decode("utf-8", "surrogateescape"), vtype)
        elif name == "general.alignment":  # the writer must pad to it, not only state it
            writer.add_custom_alignment(int(field.parts[-1][0]))
        else:
            writer.add_key_value(name, field.parts[-1][0].item(), vtype)


def write_streamed(path: Path, reader, tensors: Iterable[tuple[str, int, tuple[int, ...], Callable]]) -> None:
    """A GGUF file at `path` with `reader`'s metadata and the given tensors, in order: (name,
    ggml type, shape as stored: rows of bytes for block types, elements for float ones, and a
    function that makes the array), each made and written after the header, one at a time."""
    import gguf

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8")
    w = gguf.GGUFWriter(path, arch)
    copy_fields(reader, w)
    tensors = list(tensors)
    for name, qtype, shape, _ in tensors:
        qt = gguf.GGMLQuantizationType(qtype)
        dtype = {qt.F32: np.float32, qt.F16: np.float16}.get(qt, np.uint8)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, shape, make in tensors:
        data = np.ascontiguousarray(make())
        if data.shape != tuple(shape):
            raise ValueError(f"a tensor of shape {data.shape} where {tuple(shape)} was announced")
        w.write_tensor_data(data)
    w.close()
