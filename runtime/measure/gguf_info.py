"""What bench needs to know about a GGUF, read from its header in plain Python (the device side has
no gguf-py): its file type (general.file_type), and every tensor's name, type and byte size, for
the weight bytes llama.cpp reads per decoded token.

GGUF (v2, v3): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
(key, type, value), then per tensor: name, u32 n_dims, u64 dims, u32 ggml type, u64 offset.
Little-endian only (a big-endian GGUF is refused).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError

# ggml type -> (name, values per block, bytes per block): llama.cpp's ggml-common.h, as vendored in
# llama-cpp-python 0.3.36 (gguf-py's GGML_QUANT_SIZES).
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
              23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
              35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18)}
# general.file_type (llama_ftype) -> the name llama.cpp prints for it (llama-bench's model_type)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
              25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
              32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE"}
# a package's storage dtype -> the llama.cpp file type of the same width (same encodings: Q8_0, Q4_0)
SAME_WIDTH = {"float32": "F32", "float16": "F16", "int8": "Q8_0", "int4": "Q4_0"}

# metadata value types: struct format of the scalars; 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]        # GGUF order: shape[0] is the row length (ne0)
    type: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type][0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size

    @property
    def row_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.type]
        return self.shape[0] // block * size


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    metadata: dict            # scalar and string values (arrays are skipped)
    tensors: tuple[Tensor, ...]

    @property
    def file_type(self) -> str | None:
        """The file type llama.cpp names (Q4_0, F16, ...), or None when the GGUF does not say."""
        ft = self.metadata.get("general.file_type")
        return None if ft is None else FILE_TYPES.get(int(ft), f"file type {ft}")

    def tensor(self, name: str) -> Tensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every tensor once, except the token embedding, of which
        one row is read (get_rows) unless it is also the output matrix (no output.weight: tied)."""
        total = sum(t.nbytes for t in self.tensors)
        embd = self.tensor("token_embd.weight")
        if embd is not None and self.tensor("output.weight") is not None:
            total += embd.row_bytes - embd.nbytes
        return total


class _Reader:
    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        b = self.fh.read(n)
        if len(b) != n:
            raise EdgesparseError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, b)[0]

    def string(self) -> str:
        n = self.take("<Q")
        b = self.fh.read(n)
        if len(b) != n:
            raise EdgesparseError(f"{self.path}: truncated GGUF header")
        return b.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:                 # array: skipped (the vocabulary is 50k+ strings)
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALAR:
                self.fh.seek(n * struct.calcsize(_SCALAR[etype]), 1)
            else:
                for _ in range(n):
                    self.value(etype)
            return None
        raise EdgesparseError(f"{self.path}: unknown GGUF metadata value type {vtype}")


def read(path: str | Path) -> GGUFInfo:
    """The metadata scalars and the tensor table of a GGUF file (the tensor data is not read)."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise EdgesparseError(f"{path}: cannot open ({e.strerror})") from None
    with fh:
        r = _Reader(fh, path)
        if fh.read(4) != b"GGUF":
            raise EdgesparseError(f"{path}: not a GGUF file (no GGUF magic)")
        version = r.take("<I")
        if version not in (2, 3):
            raise EdgesparseError(f"{path}: GGUF version {version}; expected 2 or 3 (little-endian)")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            v = r.value(r.take("<I"))
            if v is not None:
                meta[key] = v
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            shape = tuple(r.take("<Q") for _ in range(r.take("<I")))
            ttype = r.take("<I")
            r.take("<Q")                  # offset into the data section
            if ttype not in GGML_TYPES:
                raise EdgesparseError(f"{path}: tensor {name} has ggml type {ttype}, unknown to edgesparse")
            tensors.append(Tensor(name, shape, ttype))
    return GGUFInfo(path, meta, tuple(tensors))
