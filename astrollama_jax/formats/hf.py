"""Hugging Face ``LlamaForCausalLM`` folders (``config.json`` + safetensors) <-> our parameters.

Reading memory-maps the safetensors files and stacks one parameter at a time
(``mapping.stack_params``), so host memory holds at most the model once plus one tensor.
Writing plans the shards (at most ``max_shard_bytes`` each) from the shapes, then transposes
one tensor at a time straight into its file, inside ``diskspace.atomic_directory``, so an
interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from safetensors import safe_open

from astrollama_jax.formats import mapping
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.util import diskspace

Params = dict[str, Any]
INDEX_FILE = "model.safetensors.index.json"


# --- reading -----------------------------------------------------------------------------------


def read_hf_config(folder: str) -> LlamaConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  with open(path) as f:
    return LlamaConfig.from_hf_config(json.load(f))


def weight_files(folder: str) -> dict[str, str]:
  """tensor name -> safetensors file, from the index or by scanning single files.

  An index may only name files inside ``folder``: a checkpoint from elsewhere must not make us
  open arbitrary files (``../../x`` or an absolute path is refused), and neither may a shard
  that is a link resolving outside it. Every shard's header is checked against its file
  (``check_shard``) before any tensor is read.
  """
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    for name, fn in weight_map.items():
      if os.path.isabs(fn) or os.path.normpath(fn).split(os.sep)[0] == os.pardir:
        raise ConversionError(
          f"{index}: weight_map entry {name!r} points outside the folder "
          f"({fn!r}); shard files must be inside {folder}"
        )
    missing = sorted(
      {fn for fn in weight_map.values() if not os.path.isfile(os.path.join(folder, fn))}
    )
    if missing:
      raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
    for fn in sorted(set(weight_map.values())):
      check_shard(folder, os.path.join(folder, fn))
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  files = sorted(fn for fn in os.listdir(folder) if fn.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files (and no index) in {folder}")
  out = {}
  for fn in files:
    path = os.path.join(folder, fn)
    for k in check_shard(folder, path):
      out[k] = path
  return out


class TensorReader:
  """Memory-mapped access to an HF folder's tensors by name, keeping each file open once."""

  def __init__(self, folder: str, files: dict[str, str] | None = None):
    self.files = weight_files(folder) if files is None else files  # checked by weight_files
    self._open: dict[str, Any] = {}

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
    fn = self.files[name]
    if fn not in self._open:
      try:
        self._open[fn] = safe_open(fn, framework="numpy")
      except Exception as e:  # truncated or not a safetensors file
        raise ConversionError(f"cannot read {fn}: {e}") from e
    try:
      return self._open[fn].get_tensor(name)
    except Exception as e:  # the index names a tensor the file lacks, or the file changed
      raise ConversionError(f"cannot read tensor {name!r} from {fn}: {e}") from e

  def release(self) -> None:
    """Drop the open files so their mapped pages can leave resident memory."""
    self._open.clear()


def stored_dtype(folder: str) -> str:
  """The dtype an HF folder stores (that of its embedding table), from the header alone: the
  table itself may be gigabytes."""
  name = "model.embed_tokens.weight"
  files = weight_files(folder)
  if name not in files:
    raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
  stored = safe_open(files[name], framework="numpy").get_slice(name).get_dtype()
  dtypes = {st: ours for ours, st in _ST_DTYPES.items()}
  if stored not in dtypes:
    raise ConversionError(
      f"{files[name]}: {name} is stored as {stored}, which no model of ours holds"
    )
  return dtypes[stored]


def iter_hf_params(
  folder: str,
  cfg: LlamaConfig,
  dtype: str | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yield (our path, stacked numpy array) one parameter at a time, checking every shape."""
  reader = TensorReader(folder)
  used: set[str] = set()

  def read(entry: mapping.Tensor, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    del shape  # checked by stack_params
    for name in entry.hf_names(cfg.n_layers):
      used.add(name)
      yield reader.get(name)
    reader.release()

  yield from mapping.stack_params(cfg, read, dtype, progress)
  extra = sorted(n for n in set(reader.files) - used if "rotary_emb" not in n)
  if extra:
    logging.warning("ignored %d tensors the model does not use: %s", len(extra), extra[:5])


class HFStackedArray(mapping.LazyArray):
  """One of our stacked parameters over an HF folder, read only when asked: ``x[i]`` reads
  layer ``i``'s tensor alone (``checkpoints.reader.StoredArray``'s contract), so a merge or an
  export walking the model one tensor at a time holds one tensor, not the model."""

  def __init__(
    self, folder: str, files: dict[str, str], entry: mapping.Tensor, shape: Any, dtype: Any
  ):
    self._folder, self._files, self._entry = folder, files, entry
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def _read(self, name: str) -> np.ndarray:
    reader = TensorReader(self._folder, self._files)  # no mapped file outlives the read
    w = reader.get(name)
    want = self._entry.to_hf(
      np.empty(self.shape[1:] if self._entry.per_layer else self.shape, np.int8)
    )
    if tuple(w.shape) != tuple(want.shape):
      raise ConversionError(
        f"tensor {name!r} has shape {tuple(w.shape)} but the config expects {tuple(want.shape)}"
      )
    out = np.array(self._entry.from_hf(w), dtype=self.dtype)  # a copy: no view into the file
    del w
    reader.release()
    return out

  def __getitem__(self, index: Any) -> np.ndarray:
    if self._entry.per_layer and isinstance(index, (int, np.integer)):
      return self._read(self._entry.hf_name.format(i=int(index)))
    return np.asarray(self)[index]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    if self._entry.per_layer:
      out = np.empty(self.shape, self.dtype)
      for i in range(self.shape[0]):
        out[i] = self[i]
    else:
      out = self._read(self._entry.hf_name)
    return out if dtype is None else out.astype(dtype)


def open_hf_params(folder: str, dtype: str | None = None) -> tuple[LlamaConfig, Params]:
  """(config, ``HFStackedArray`` leaves) of an HF folder, no tensor read; ``dtype`` casts
  (default: the stored dtype, which the returned ``cfg.param_dtype`` names)."""
  dtype = dtype or stored_dtype(folder)
  cfg = read_hf_config(folder).replace(param_dtype=str(np.dtype(dtype)))
  shapes, files = llama.param_shapes(cfg), weight_files(folder)
  params: Params = {}
  for entry in mapping.table(cfg):
    shape = mapping.get_path(shapes, entry.path).shape
    mapping.set_path(params, entry.path, HFStackedArray(folder, files, entry, shape, dtype))
  return cfg, params


def load_hf(
  folder: str, dtype: str | None = None, cfg: LlamaConfig | None = None
) -> tuple[LlamaConfig, Params]:
  """Read an HF Llama folder into (config, numpy params). ``dtype`` casts on the way."""
  hf_cfg = read_hf_config(folder)
  if cfg is None:
    cfg = hf_cfg.replace(param_dtype=dtype or "float32")
  else:
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      if getattr(cfg, field) != getattr(hf_cfg, field):
        raise ConversionError(
          f"config mismatch: {field} is {getattr(hf_cfg, field)} in "
          f"{folder}/config.json but {getattr(cfg, field)} in the model config"
        )
  params: Params = {}
  for path, arr in iter_hf_params(folder, cfg, dtype):
    mapping.set_path(params, path, arr)
  return cfg, params


# --- checking shards ---------------------------------------------------------------------------

# Bytes per element of every safetensors dtype.
_ST_ITEMSIZE = {
  "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
  "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
  "U32": 4, "I32": 4, "F32": 4,
  "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def check_shard(folder: str, path: str) -> list[str]:
  """The tensor names of safetensors file ``path`` after checking that it may be read.

  A shard must resolve inside ``folder`` (a link elsewhere is refused), and its header must
  describe its file: a length that fits the file, known dtypes, offsets inside the data that
  match each shape's size, no two tensors overlapping. Anything else is a ``ConversionError``
  naming the file, before a byte of tensor data is mapped.
  """
  real, root = os.path.realpath(path), os.path.realpath(folder)
  if os.path.commonpath([real, root]) != root:
    raise ConversionError(
      f"{path} is a link to {real}, outside {folder}; shard files must be inside the folder"
    )

  def bad(what: str) -> ConversionError:
    return ConversionError(f"{path} is not a valid safetensors file: {what}")

  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
      raise bad(f"header length {n} exceeds the file's {size} bytes (or {_MAX_HEADER})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
      raise bad("the header is not JSON") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  data_size = size - 8 - n
  spans = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or info.get("dtype") not in _ST_ITEMSIZE:
      dtype = info.get("dtype") if isinstance(info, dict) else info
      raise bad(f"tensor {name!r} has dtype {dtype!r}; known: {sorted(_ST_ITEMSIZE)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
      raise bad(f"tensor {name!r} has shape {shape!r}")
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(_count(o) for o in offsets)
      or offsets[0] > offsets[1]
    ):
      raise bad(f"tensor {name!r} has data_offsets {offsets!r}")
    start, end = offsets
    nbytes = int(np.prod(shape, dtype=object)) * _ST_ITEMSIZE[info["dtype"]]
    if nbytes != end - start:
      raise bad(
        f"tensor {name!r}: shape {shape} of {info['dtype']} is {nbytes} bytes but its "
        f"data_offsets span {end - start}"
      )
    if end > data_size:
      raise bad(
        f"tensor {name!r} ends at byte {end}, past the end of the data ({data_size} bytes: "
        "the file is truncated or the header lies)"
      )
    spans.append((start, end, name))
  spans.sort()
  for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
    if start_b < end_a:
      raise bad(f"tensor {b!r} overlaps tensor {a!r}")
  return [name for _, _, name in spans]


def _count(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --- writing -----------------------------------------------------------------------------------

# safetensors' names of the dtypes a checkpoint can hold
_ST_DTYPES = {
  "float32": "F32",
  "float16": "F16",
  "bfloat16": "BF16",
  "float64": "F64",
  "int64": "I64",
  "int32": "I32",
  "int16": "I16",
  "int8": "I8",
  "uint8": "U8",
  "bool": "BOOL",
}
Spec = tuple[str, tuple[int, ...], np.dtype]


def safetensors_header(
  specs: list[Spec], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
  """The bytes before the data of a safetensors file holding ``specs``, and each tensor's offset
  into the data, exactly as ``safetensors.numpy.save_file`` lays them out.

  That is: tensors sorted by dtype size (largest first), then name; a compact JSON header with
  ``__metadata__`` first, padded with spaces to a multiple of 8 bytes, after its 8-byte length.
  Knowing it before any tensor is read lets a file be written one tensor at a time.
  """
  order = sorted(specs, key=lambda sp: (-np.dtype(sp[2]).itemsize, sp[0]))
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  offsets, pos = {}, 0
  for name, shape, dtype in order:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": _ST_DTYPES[np.dtype(dtype).name],
      "shape": list(shape),
      "data_offsets": [pos, pos + nbytes],
    }
    offsets[name], pos = pos, pos + nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text, offsets


class _ShardWriter:
  """One safetensors file written tensor by tensor, in any order, at offsets known up front."""

  def __init__(self, path: str, specs: list[Spec]):
    head, offsets = safetensors_header(specs, {"format": "pt"})
    self._f = open(path, "wb")  # noqa: SIM115  (closed by put, when the last tensor is in)
    self._f.write(head)
    self._start, self._offsets = len(head), offsets
    self._left = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype in specs}

  def put(self, name: str, arr: np.ndarray) -> bool:
    """Write one tensor; True once the file is complete (and closed)."""
    want = self._left.pop(name)
    if (arr.shape, arr.dtype) != want:
      raise ConversionError(
        f"tensor {name} is {arr.dtype}{list(arr.shape)}, planned as {want[1]}{list(want[0])}"
      )
    self._f.seek(self._start + self._offsets[name])
    self._f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    if not self._left:
      self._f.close()
    return not self._left

  def abort(self) -> None:
    self._f.close()


def plan_shards(specs: list[Spec], max_shard_bytes: int) -> list[list[Spec]]:
  """Consecutive tensors grouped into files of at most ``max_shard_bytes`` (one tensor may be
  bigger on its own): the same grouping whether tensors are buffered or streamed."""
  shards: list[list[Spec]] = [[]]
  size = 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return [s for s in shards if s]


def save_hf(
  cfg: LlamaConfig,
  params: Params,
  folder: str,
  dtype: str | None = None,
  max_shard_bytes: int = 2 * 1024**3,
  extra_files: Callable[[str], None] | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
  """Write an HF folder (config.json, generation_config.json, sharded safetensors + index).

  Every shard's layout is planned from the shapes before any tensor is read, so each tensor is
  written into its file as soon as it is made and dropped: host memory holds about one tensor
  (twice: read and transposed), whatever the shard size, and with the lazy parameters of
  ``checkpoints.loader.load_model(lazy=True)`` not the model either. The folder appears atomically
  (``diskspace.atomic_directory``). A disk too small for the tensors is refused up front; one
  that fills up anyway (other writers) gives a ``diskspace.DiskFullError`` naming ``folder``.
  ``extra_files(tmpdir)`` may add tokenizer files before the folder appears.
  """
  folder = os.path.abspath(folder)
  diskspace.check_free_space(
    folder,
    sum(x.size * np.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(params)),
    "the output folder",
  )
  t0 = time.time()
  shards = plan_shards(list(mapping.hf_shapes(cfg, params, dtype)), max_shard_bytes)
  names = [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
  file_of = {spec[0]: j for j, shard in enumerate(shards) for spec in shard}
  with diskspace.atomic_directory(folder) as tmp:
    total_bytes = total_params = n_tensors = 0
    writer, current = None, -1
    try:
      for name, arr in mapping.hf_tensors(cfg, params, dtype):
        if file_of[name] != current:
          current = file_of[name]
          writer = _ShardWriter(os.path.join(tmp, names[current]), shards[current])
        writer.put(name, arr)
        total_bytes += arr.nbytes
        total_params += arr.size
        n_tensors += 1
        if progress:
          progress(name, arr)
        del arr
    finally:
      if writer is not None:
        writer.abort()
    weight_map = {spec[0]: names[j] for j, shard in enumerate(shards) for spec in shard}
    _write_json(
      tmp,
      INDEX_FILE,
      {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
    )
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = str(np.dtype(dtype)) if dtype else cfg.param_dtype
    _write_json(tmp, "config.json", hf_cfg)
    _write_json(
      tmp,
      "generation_config.json",
      {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": cfg.max_seq_len,
      },
    )
    if extra_files:
      extra_files(tmp)
  return {
    "tensors": n_tensors,
    "parameters": total_params,
    "bytes": total_bytes,
    "shards": len(shards),
    "seconds": time.time() - t0,
  }


def _write_json(folder: str, name: str, value: Any) -> None:
  with open(os.path.join(folder, name), "w") as f:
    json.dump(value, f, indent=2)
