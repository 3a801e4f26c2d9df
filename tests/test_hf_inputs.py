"""HF folders as a careless or hostile sender makes them: RoPE scaling in either config key,
shards linked from elsewhere, safetensors headers that lie. Each is refused in one line naming
what is wrong, before any output exists."""

import json
import os
from pathlib import Path
import subprocess
import sys

from hf_reference import TINY_GQA
import numpy as np
import pytest
from safetensors.numpy import save_file
import transformers

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.convert import convert
from astrollama_jax.formats import hf
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model.config import LlamaConfig

CFG = TINY_GQA
SHARD = "model-00001-of-00001.safetensors"


def _hf_config(**changes) -> dict:
  out = {k: v for k, v in CFG.to_hf_config().items() if k not in ("rope_theta", "rope_scaling")}
  return {**out, **changes}


def _folder(path: Path, config: dict | None = None, index: bool = False) -> Path:
  """An HF folder holding one small (shape-wrong but well-formed) shard: enough for every check
  that runs before a tensor is compared with the config."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config or _hf_config()))
  save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(path / SHARD))
  if index:
    weight_map = {"model.embed_tokens.weight": SHARD}
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return path


def _convert(folder: Path, out: Path, tokenizer_path: str) -> None:
  convert("hf", str(folder), str(out), tokenizer=tokenizer_path, show_progress=False)


def _one_line_error(argv: list[str]) -> str:
  proc = subprocess.run(
    [sys.executable, "-m", "astrollama_jax", *argv],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=300,
    check=False,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


# --- RoPE scaling: rope_scaling (transformers 4) and rope_parameters (transformers 5) --------


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize(
  "scaling",
  [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192},
    {"type": "dynamic", "factor": 2.0},
  ],
  ids=["linear", "yarn", "dynamic_old_spelling"],
)
def test_rope_scaling_in_either_key_is_refused_naming_its_type(key, scaling):
  kind = scaling.get("rope_type") or scaling["type"]
  with pytest.raises(ValueError, match=rf"RoPE scaling {kind!r} \(config.json {key}\)"):
    LlamaConfig.from_hf_config(_hf_config(**{key: {**scaling, "rope_theta": 5e5}}))


def test_transformers_5_config_json_is_read_and_other_scalings_refused():
  def saved(**kw) -> dict:
    sizes = {k: v for k, v in _hf_config().items() if k != "torch_dtype"}
    return transformers.LlamaConfig(**sizes, **kw).to_diff_dict()

  plain = saved(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
  assert "rope_theta" not in plain or plain["rope_theta"] is None
  assert LlamaConfig.from_hf_config(plain).rope_theta == 500000.0
  for none in ({"rope_type": "none"}, {"type": "default"}, {}, None):
    assert LlamaConfig.from_hf_config(_hf_config(rope_scaling=none)).rope_theta == 10000.0
  with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
    LlamaConfig.from_hf_config(saved(rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_convert_and_serve_refuse_a_scaled_folder_before_writing(tmp_path, tokenizer_path):
  scaled = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
  folder = _folder(tmp_path / "hf", _hf_config(rope_parameters=scaled))
  with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
    _convert(folder, tmp_path / "out", tokenizer_path)
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
    loader.load_model(str(folder))  # what serve, chat and eval load through


# --- shards linked from outside the folder -------------------------------------------------


@pytest.mark.parametrize("index", [True, False], ids=["index", "no_index"])
def test_a_shard_linked_from_outside_the_folder_is_refused(tmp_path, tokenizer_path, index):
  folder = _folder(tmp_path / "hf", index=index)
  outside = tmp_path / "elsewhere" / "secret.safetensors"
  outside.parent.mkdir()
  (folder / SHARD).rename(outside)
  (folder / SHARD).symlink_to(outside)
  with pytest.raises(ConversionError, match=rf"{SHARD} is a link to .*outside {folder}"):
    _convert(folder, tmp_path / "out", tokenizer_path)
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConversionError, match="outside"):
    loader.load_model(str(folder))


def test_a_shard_linked_within_the_folder_is_read(tmp_path):
  folder = _folder(tmp_path / "hf", index=True)
  (folder / "blobs").mkdir()
  (folder / SHARD).rename(folder / "blobs" / "x")
  (folder / SHARD).symlink_to(Path("blobs") / "x")  # how a download cache lays files out
  assert hf.weight_files(str(folder)) == {"model.embed_tokens.weight": str(folder / SHARD)}


# --- safetensors headers that lie -----------------------------------------------------------


def _header_file(path: Path, header: dict | None, data: bytes, length: int | None = None) -> None:
  text = json.dumps(header).encode() if header is not None else b""
  text += b" " * (-len(text) % 8)
  path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


def _t(shape, start, end, dtype="F32"):
  return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


E = "model.embed_tokens.weight"
LIES = {
  "wrong_shape": ({E: _t([4, 4], 0, 16)}, 16, None, r"shape \[4, 4\] of F32 is 64 bytes"),
  "offsets_past_the_end": ({E: _t([4], 0, 16)}, 8, None, "past the end of the data"),
  "huge_header_length": (None, 0, 2**62, "header length"),
  "truncated": ({E: _t([100], 0, 400)}, 360, None, "past the end of the data"),
  "overlapping": (
    {E: _t([4], 0, 16), "lm_head.weight": _t([4], 8, 24)},
    24,
    None,
    "overlaps",
  ),
  "not_json": (None, 0, 16, "header is not JSON"),
  "unknown_dtype": ({E: _t([4], 0, 16, "F99")}, 16, None, "dtype 'F99'"),
  "negative_offset": ({E: _t([4], -16, 0)}, 16, None, "data_offsets"),
}


@pytest.mark.parametrize("index", [True, False], ids=["index", "no_index"])
@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_safetensors_header_is_named_in_one_error(tmp_path, tokenizer_path, lie, index):
  header, n_data, length, match = LIES[lie]
  folder = _folder(tmp_path / "hf", index=index)
  data = b"\0" * n_data if header is not None or length is None else b"{not json" + b"\0" * 7
  _header_file(folder / SHARD, header, data, length)
  with pytest.raises(ConversionError, match=match) as err:
    _convert(folder, tmp_path / "out", tokenizer_path)
  assert str(folder / SHARD) in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "out").exists()


def test_convert_command_names_a_lying_shard_in_one_line(tmp_path, tokenizer_path):
  folder = _folder(tmp_path / "hf")
  _header_file(folder / SHARD, None, b"", 2**62)
  line = _one_line_error(
    [
      "convert",
      "--source_format=hf",
      f"--source={folder}",
      f"--output={tmp_path / 'out'}",
      f"--tokenizer={tokenizer_path}",
    ]
  )
  assert str(folder / SHARD) in line and "header length" in line
  assert not (tmp_path / "out").exists()
