"""The edgesparse package format, version 4: a directory with a manifest.

    PKG/
      manifest.json          format name + version, source, config, files, tensors, layers, sparsity
      tokenizer.json         Hugging Face `tokenizers` file (+ chat template in the manifest)
      attn/NNN.onnx          layer NNN's attention core for ONNX Runtime: rotary + KV cache + softmax(QK)V
                             on the packed q|k|v projection
      attn/NNN.bin           layer NNN's norms and q|k|v and o projections, raw, [out, in] row-major
      ffn/NNN.bin            layer NNN's FFN, neuron-major [n_neurons, R, d_model] (gate row, up row,
                             down column of each neuron contiguous; R = 2 for plain MLPs: fc1 row, fc2
                             column), little-endian, offset 0; int4 / int8 in blocks of 16 neurons
                             (edgesparse/tiles.py)
      embed.bin, head.bin, norm.bin, rope.bin   raw little-endian tensors

Version 4 stores int4 and int8 matrices as 16-row tiles with their scales inside (q4x16 / q8x16,
edgesparse/tiles.py: llama.cpp's repacking idea) and int4 / int8 FFNs in blocks of 16 neurons
(q4ffn / q8ffn). Older versions are refused with a message to re-export (docs/FORMAT.md#versioning
has their history).

Every file is listed with its size and sha256; every raw tensor with file, dtype, shape and a
page-aligned byte offset. Reading checks the cheap things (version, types, sizes, bounds) on
every load; `verify` also checks the hashes. docs/FORMAT.md is the prose version of this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from . import tiles
from .config import ModelConfig
from .errors import PackageError

FORMAT_NAME = "edgesparse"
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
PAGE = 4096  # raw tensor offsets are multiples of this so each tensor can be mmap'd page-aligned

# dtype name -> numpy dtype of its storage unit (little-endian). The tiled dtypes are bytes whose
# view type says the width to the kernels (uint8: int4, int8: int8; edgesparse/tiles.py).
DTYPES = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "int8": "<i1",
          "q4x16": "<u1", "q8x16": "<i1", "q4ffn": "<u1", "q8ffn": "<i1"}
# Tiled dtypes -> bits per weight value. A tensor of one of these has the logical shape of the
# matrix it stands for ([O, D], or [N, R, D] for an FFN) and carries its scales inside; rows must
# be whole groups of 32 (edgesparse/tiles.py).
TILED = {"q4x16": 4, "q8x16": 8}
FFN_BLOCKS = {"q4ffn": 4, "q8ffn": 8}
# what an int8 tensor's NAME.scale holds (rows that are not whole groups of 32; see edgesparse/quant.py)
QUANTIZED = {"int8": "one float32 scale per row"}
FILE_KINDS = ("raw", "onnx", "tokenizer")
SPARSITY_METHODS = ("none", "synthetic", "paper", "gate", "input")


@dataclass(frozen=True)
class FileEntry:
    path: str       # relative to the package directory, '/'-separated
    kind: str       # raw | onnx | tokenizer
    size: int       # bytes
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * int(DTYPES[self.dtype][-1])

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the array as stored: tiles [ceil(N/16), *mid, D/32, tile bytes], FFN
        blocks [ceil(N/16), block bytes] (edgesparse/tiles.py); the logical shape otherwise."""
        if self.dtype in TILED:
            return tiles.tiled_shape(self.shape, TILED[self.dtype])
        if self.dtype in FFN_BLOCKS:
            return tiles.ffn_shape(self.shape, FFN_BLOCKS[self.dtype])
        return self.shape


# A layer's tensors by role (HF naming, mapped once at export): role -> required?
LAYER_TENSORS = {"attn_norm": True, "qkv": True, "qkv_bias": False, "o": True, "o_bias": False,
                 "ffn_norm": False, "ffn": True, "pred_q": False, "pred_scale": False,
                 "attn_norm_bias": False, "ffn_norm_bias": False, "q_norm": False, "k_norm": False,
                 "attn_out_norm": False, "ffn_out_norm": False, "ffn_bias_in": False, "ffn_bias_out": False,
                 "rope_cos": False, "rope_sin": False, "rope_cos_long": False, "rope_sin_long": False}
# Small tensors the kernels read as float32 whatever the storage dtype.
FLOAT32_ROLES = ("attn_norm", "ffn_norm", "qkv_bias", "o_bias", "pred_scale", "attn_norm_bias", "ffn_norm_bias",
                 "q_norm", "k_norm", "attn_out_norm", "ffn_out_norm", "ffn_bias_in", "ffn_bias_out",
                 "rope_cos", "rope_sin", "rope_cos_long", "rope_sin_long")


@dataclass(frozen=True)
class LayerEntry:
    attention: str   # file path of the layer's ONNX graph (GroupQueryAttention)
    ffn: str         # tensor name of the layer's neuron-major FFN weights [N, R, D], R = config.ffn_rows
    threshold: float  # |h| < threshold is zeroed; 0.0 = dense
    attn_norm: str = ""   # [D] norm n1 (see config.BLOCKS)
    qkv: str = ""         # [(H + 2 Hkv) hd, D] packed q|k|v projection, [out, in]
    o: str = ""           # [D, H hd] output projection, [out, in]
    ffn_norm: str | None = None   # [D] norm n2 (none in a parallel block)
    qkv_bias: str | None = None   # [(H + 2 Hkv) hd] (Qwen2, Phi-2, OPT)
    o_bias: str | None = None     # [D]
    # The activation predictor (edgesparse calibrate --predictor): int8 copies of the gate and up
    # rows (fc1 for plain MLPs), and the threshold on the predicted |h| that makes a candidate.
    pred_q: str | None = None      # [N, R-1, D] int8
    pred_scale: str | None = None  # [N, R-1] float32, one scale per row
    pred_threshold: float | None = None
    attn_norm_bias: str | None = None   # [D] LayerNorm biases
    ffn_norm_bias: str | None = None    # [D]
    q_norm: str | None = None           # [hd] RMS norm of each query head before rotary (Gemma-3)
    k_norm: str | None = None           # [hd]
    attn_out_norm: str | None = None    # [D] norm of the attention output before the residual add (Gemma-3)
    ffn_out_norm: str | None = None     # [D] norm of the FFN output before the residual add (Gemma-3)
    ffn_bias_in: str | None = None      # [N, R-1] per neuron: (gate, up) or fc1 bias
    ffn_bias_out: str | None = None     # [D] down / fc2 bias
    rope_cos: str | None = None         # [max_position, rotary_dim/2] this layer's rotary table
    rope_sin: str | None = None         # (Gemma-3: local and global layers differ)
    rope_cos_long: str | None = None    # LongRoPE tables for positions past config.rope_long_after
    rope_sin_long: str | None = None

    def tensor_names(self) -> dict[str, str]:
        """role -> tensor name, for the roles this layer has."""
        return {r: getattr(self, r) for r in LAYER_TENSORS if getattr(self, r) is not None}


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    source: dict
    exporter: dict
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    layers: tuple[LayerEntry, ...]
    sparsity: dict          # {"method": str, ...} plus calibration tables when calibrated
    chat_template: str | None

    def tensor(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise PackageError(f"manifest: tensor {name!r} is missing") from None


def _need(d: dict, key: str, typ, where: str):
    if key not in d:
        raise PackageError(f"{where}: missing key {key!r}")
    v = d[key]
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, (int, float)))
    if not ok:
        tn = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise PackageError(f"{where}: key {key!r} must be {tn}, got {v!r}"[:300])
    return v


def _relpath(p: str, where: str) -> str:
    # No absolute paths, no '..': a package can only point inside itself.
    parts = p.split("/")
    if not p or p.startswith("/") or "\\" in p or any(x in ("", ".", "..") for x in parts):
        raise PackageError(f"{where}: {p!r} is not a relative path inside the package")
    return p


def parse_manifest(doc: object, where: str = MANIFEST) -> Manifest:
    """Validate a decoded manifest.json (types, keys, versions, shapes, alignment)."""
    if not isinstance(doc, dict):
        raise PackageError(f"{where}: expected a JSON object at the top level")
    fmt = _need(doc, "format", str, where)
    if fmt != FORMAT_NAME:
        raise PackageError(f"{where}: format is {fmt!r}, expected {FORMAT_NAME!r}")
    ver = _need(doc, "format_version", int, where)
    if ver != FORMAT_VERSION:
        hint = "; re-export the model with this edgesparse" if 0 < ver < FORMAT_VERSION else ""
        raise PackageError(f"{where}: unknown format version {ver}; this edgesparse reads version "
                           f"{FORMAT_VERSION}{hint}")
    config = ModelConfig.from_json(_need(doc, "config", dict, where))

    files: dict[str, FileEntry] = {}
    for i, f in enumerate(_need(doc, "files", list, where)):
        w = f"{where}: files[{i}]"
        if not isinstance(f, dict):
            raise PackageError(f"{w}: expected an object")
        path = _relpath(_need(f, "path", str, w), w)
        kind = _need(f, "kind", str, w)
        if kind not in FILE_KINDS:
            raise PackageError(f"{w}: kind {kind!r} is not one of {FILE_KINDS}")
        size = _need(f, "size", int, w)
        if size < 0:
            raise PackageError(f"{w}: negative size {size}")
        sha = _need(f, "sha256", str, w)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise PackageError(f"{w}: sha256 must be 64 lowercase hex digits")
        if path in files:
            raise PackageError(f"{w}: {path!r} is listed twice")
        files[path] = FileEntry(path, kind, size, sha)

    tensors: dict[str, TensorEntry] = {}
    for name, t in _need(doc, "tensors", dict, where).items():
        w = f"{where}: tensors[{name!r}]"
        if not isinstance(t, dict):
            raise PackageError(f"{w}: expected an object")
        file = _need(t, "file", str, w)
        if file not in files or files[file].kind != "raw":
            raise PackageError(f"{w}: file {file!r} is not a raw file listed in 'files'")
        dtype = _need(t, "dtype", str, w)
        if dtype not in DTYPES:
            raise PackageError(f"{w}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        shape = _need(t, "shape", list, w)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise PackageError(f"{w}: shape must be a non-empty list of positive integers, got {shape!r}")
        offset = _need(t, "offset", int, w)
        if offset < 0 or offset % PAGE:
            raise PackageError(f"{w}: offset {offset} is not a non-negative multiple of {PAGE}")
        if dtype in FFN_BLOCKS and len(shape) != 3:
            raise PackageError(f"{w}: a {dtype} tensor is an FFN [n_neurons, R, d_model], got shape {shape}")
        if (dtype in TILED or dtype in FFN_BLOCKS) and shape[-1] % 32:
            raise PackageError(f"{w}: a {dtype} tensor's rows are groups of 32 values; the last axis is {shape[-1]}")
        te = TensorEntry(name, file, dtype, tuple(shape), offset)
        if offset + te.nbytes > files[file].size:
            raise PackageError(f"{w}: bytes {offset}..{offset + te.nbytes} run past the end of {file} "
                               f"({files[file].size} bytes)")
        tensors[name] = te

    layers = []
    raw_layers = _need(doc, "layers", list, where)
    if len(raw_layers) != config.n_layers:
        raise PackageError(f"{where}: {len(raw_layers)} layers listed, config says {config.n_layers}")
    for i, l in enumerate(raw_layers):
        w = f"{where}: layers[{i}]"
        if not isinstance(l, dict):
            raise PackageError(f"{w}: expected an object")
        attn = _need(l, "attention", str, w)
        if attn not in files or files[attn].kind != "onnx":
            raise PackageError(f"{w}: attention {attn!r} is not an onnx file listed in 'files'")
        names = {}
        for role, required in LAYER_TENSORS.items():
            if not required and l.get(role) is None:
                continue
            name = _need(l, role, str, w)
            if name not in tensors:
                raise PackageError(f"{w}: {role} tensor {name!r} is not in 'tensors'")
            names[role] = name
        th = _need(l, "threshold", (int, float), w)
        if isinstance(th, int) and abs(th) > 2**1023:   # JSON integers are unbounded; float() would overflow
            raise PackageError(f"{w}: threshold is an integer too large for a float")
        if not (math.isfinite(th) or th == math.inf) or th < 0:
            raise PackageError(f"{w}: threshold must be >= 0 (inf allowed), got {th!r}")
        pth = l.get("pred_threshold")
        if ("pred_q" in names) != ("pred_scale" in names) or ("pred_q" in names) != (pth is not None):
            raise PackageError(f"{w}: pred_q, pred_scale and pred_threshold come together or not at all")
        if pth is not None:
            # <= the largest float, not < inf: a huge JSON integer would overflow float() below
            if isinstance(pth, bool) or not isinstance(pth, (int, float)) or not (0 <= pth <= sys.float_info.max):
                raise PackageError(f"{w}: pred_threshold must be a finite number >= 0, got {pth!r}"[:300])
            pth = float(pth)
        layers.append(LayerEntry(attention=attn, threshold=float(th), pred_threshold=pth, **names))

    sparsity = _need(doc, "sparsity", dict, where)
    method = _need(sparsity, "method", str, f"{where}: sparsity")
    if method not in SPARSITY_METHODS:
        raise PackageError(f"{where}: sparsity.method {method!r} is not one of {SPARSITY_METHODS}")
    tmpl = doc.get("chat_template")
    if tmpl is not None and not isinstance(tmpl, str):
        raise PackageError(f"{where}: chat_template must be a string or null")
    if "tokenizer.json" not in files or files["tokenizer.json"].kind != "tokenizer":
        raise PackageError(f"{where}: 'files' must list tokenizer.json")
    _check_shapes(config, tensors, layers, where)
    return Manifest(config=config, source=_need(doc, "source", dict, where),
                    exporter=_need(doc, "exporter", dict, where), files=files, tensors=tensors,
                    layers=tuple(layers), sparsity=sparsity, chat_template=tmpl)


def layer_neurons(c: ModelConfig, tensors: dict, layer: "LayerEntry", where: str) -> int:
    """Neurons of one layer's FFN: config.ffn_dim, or fewer in a pruned package (edgesparse prune
    drops neurons calibration found almost never active)."""
    t = tensors.get(layer.ffn)
    n = t.shape[0] if t is not None and t.shape else c.ffn_dim
    if not 1 <= n <= c.ffn_dim:
        raise PackageError(f"{where}: tensor {layer.ffn!r} has {n} neurons, expected 1 .. ffn_dim={c.ffn_dim}")
    return n


def expected_shapes(c: ModelConfig, layers, where: str = MANIFEST, tensors: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The shape every tensor must have for this config: the kernels index by these numbers.
    tensors: the manifest's, to read each layer's neuron count (pruned packages); without it every
    layer has config.ffn_dim."""
    D, E, R = c.d_model, c.embed_dim, c.ffn_rows
    shapes = {"embed": (c.vocab_size, E)}
    if c.final_norm:
        shapes["final_norm.weight"] = (D,)
        if c.norm == "layer":
            shapes["final_norm.bias"] = (D,)
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.vocab_size, E)
    if c.head_bias:
        shapes["lm_head.bias"] = (c.vocab_size,)
    if c.learned_positions:
        shapes["pos_embed"] = (c.max_position, D)
    if E != D:
        shapes["embed_proj_in"] = (D, E)
        shapes["head_proj_out"] = (E, D)
    q = c.n_heads * c.head_dim
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    rope = (c.max_position, c.rotary_dim // 2)
    for l in layers:
        N = c.ffn_dim if tensors is None else layer_neurons(c, tensors, l, where)
        per_role = {"attn_norm": (D,), "qkv": (qkv, D), "qkv_bias": (qkv,), "o": (D, q), "o_bias": (D,),
                    "ffn_norm": (D,), "ffn": (N, R, D), "pred_q": (N, R - 1, D), "pred_scale": (N, R - 1),
                    "attn_norm_bias": (D,), "ffn_norm_bias": (D,), "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
                    "attn_out_norm": (D,), "ffn_out_norm": (D,), "ffn_bias_in": (N, R - 1), "ffn_bias_out": (D,),
                    "rope_cos": rope, "rope_sin": rope, "rope_cos_long": rope, "rope_sin_long": rope}
        for role, name in l.tensor_names().items():
            if name in shapes and shapes[name] != per_role[role]:
                raise PackageError(f"{where}: tensor {name!r} is used as {list(shapes[name])} and as "
                                   f"{list(per_role[role])}")
            shapes[name] = per_role[role]
    return shapes


def _check_layer_roles(c: ModelConfig, l: LayerEntry, w: str) -> None:
    """The optional roles a layer must (not) have for its config: one rule per config field."""
    def need(role: str, want: bool, why: str) -> None:
        if (getattr(l, role) is not None) != want:
            raise PackageError(f"{w}: {role} must be {'present' if want else 'absent'} ({why})")
    need("ffn_norm", c.block != "parallel", f"block={c.block!r}")
    for role in ("attn_norm_bias", "ffn_norm_bias"):
        if c.norm == "rms":
            need(role, False, "RMS norms have no bias")
    if c.block == "parallel":
        need("ffn_norm_bias", False, "a parallel block has no ffn_norm")
    if c.block != "pre":
        for role in ("attn_out_norm", "ffn_out_norm"):
            need(role, False, f"branch output norms are wired in pre blocks only, block={c.block!r}")
    need("ffn_bias_in", c.ffn_bias, f"ffn_bias={c.ffn_bias}")
    need("ffn_bias_out", c.ffn_bias, f"ffn_bias={c.ffn_bias}")
    for role in ("rope_cos", "rope_sin"):
        need(role, c.rotary_dim > 0, f"rotary_dim={c.rotary_dim}")
    for role in ("rope_cos_long", "rope_sin_long"):
        need(role, c.rope_long_after > 0, f"rope_long_after={c.rope_long_after}")
    if (l.q_norm is None) != (l.k_norm is None):
        raise PackageError(f"{w}: q_norm and k_norm come together or not at all")


def _check_shapes(c: ModelConfig, tensors: dict, layers, where: str) -> None:
    pred_q = {l.pred_q for l in layers if l.pred_q is not None}
    ffns = {l.ffn for l in layers}
    for i, l in enumerate(layers):
        _check_layer_roles(c, l, f"{where}: layers[{i}]")
    for name, shape in expected_shapes(c, layers, where, tensors).items():
        if name not in tensors:
            raise PackageError(f"{where}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise PackageError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                               f"the config needs {list(shape)}")
        dt = tensors[name].dtype
        if name in pred_q:
            want = ("int8",)
        elif name in ffns:
            want = ("float32", "float16", "int8", *FFN_BLOCKS)
        else:
            want = ("float32", "float16", "int8", *TILED)
        if dt not in want or (dt in TILED and len(shape) != 2):
            raise PackageError(f"{where}: tensor {name!r} must be {' or '.join(want)}, got {dt}")
        if dt == "int8" and name not in pred_q:
            # int8 rows, one float32 scale per row: the matrices whose rows are not whole groups of
            # 32 (those are tiled, q8x16 / q8ffn; edgesparse/quant.py, tiles.py)
            sc = tensors.get(name + ".scale")
            if sc is None or (sc.dtype, sc.shape) != ("float32", shape[:-1]):
                raise PackageError(f"{where}: int8 tensor {name!r} needs a float32 tensor {name + '.scale'!r} "
                                   f"of shape {list(shape[:-1])} ({QUANTIZED['int8']})")
    # Norm weights, biases and rotary tables are tiny and read as float32 by the kernels (and the
    # rotary tables are bound as ONNX Runtime's float cos/sin caches).
    for name in ("final_norm.weight", "final_norm.bias", "lm_head.bias", "pos_embed"):
        if name in tensors and tensors[name].dtype != "float32":
            raise PackageError(f"{where}: tensor {name!r} must be float32, got {tensors[name].dtype}")
    for l in layers:
        for role in FLOAT32_ROLES:
            name = getattr(l, role)
            if name is not None and tensors[name].dtype != "float32":
                raise PackageError(f"{where}: tensor {name!r} ({role}) must be float32, got {tensors[name].dtype}")


def read_manifest(pkg: Path) -> Manifest:
    pkg = Path(pkg)
    if not pkg.exists():
        raise PackageError(f"{pkg}: no such package directory")
    if not pkg.is_dir():
        raise PackageError(f"{pkg}: not a directory (an edgesparse package is a directory with {MANIFEST})")
    mpath = pkg / MANIFEST
    if not mpath.is_file():
        raise PackageError(f"{mpath}: missing; {pkg} is not an edgesparse package")
    try:
        doc = json.loads(mpath.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or NaN from _no_constants
        raise PackageError(f"{mpath}: not valid UTF-8 JSON ({e})") from None
    return parse_manifest(doc, str(mpath))


def _no_constants(name: str):
    # json accepts NaN/Infinity/-Infinity by default. A threshold may be +inf ("no FFN"), which
    # json.dumps writes as the token Infinity; NaN and -Infinity can only mean a corrupted manifest.
    if name == "Infinity":
        return math.inf
    raise ValueError(f"{name} is not allowed")


def check_files_on_disk(pkg: Path, m: Manifest) -> None:
    """Cheap load-time check: every listed file exists with exactly the listed size."""
    for f in m.files.values():
        p = Path(pkg) / f.path
        try:
            st = p.stat()
        except FileNotFoundError:
            raise PackageError(f"{p}: missing (listed in {MANIFEST})") from None
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{p}: not a regular file (listed in {MANIFEST})")
        if st.st_size != f.size:
            what = "truncated" if st.st_size < f.size else "larger than listed"
            raise PackageError(f"{p}: {what}: {st.st_size} bytes, {MANIFEST} says {f.size}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while b := fh.read(chunk):
            h.update(b)
    return h.hexdigest()


def verify_hashes(pkg: Path, m: Manifest, progress=None) -> None:
    """Full integrity check; raises on the first file whose sha256 differs."""
    check_files_on_disk(pkg, m)
    for f in m.files.values():
        p = Path(pkg) / f.path
        if sha256_file(p) != f.sha256:
            raise PackageError(f"{p}: sha256 mismatch: the file is corrupted or was changed after export")
        if progress:
            progress(f.path)
