"""Plan a program on a TPU slice that is not there: libtpu's own compiler, run on this host.

``jax.experimental.topologies`` describes a slice (``v5p-128``, ``v4-256``, ``v5e-8`` ...) as
devices that can be compiled for but not run on. Lowering a jitted function with abstract
arguments sharded over a mesh of them and compiling it gives the per-chip plan the real slice
would execute: XLA:TPU's fusion, buffer assignment and Pallas (Mosaic) kernels, unlike the CPU
compiler's stand-in plan. Needs the ``libtpu`` package; no TPU, and the default backend may stay
CPU (``JAX_PLATFORMS=cpu``) for everything else in the process.

Off a TPU host ``devices`` sets ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` so that several processes may
plan at once (libtpu otherwise takes a per-host lock meant for real chips).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import importlib.util
import os
import re
import time
from typing import Any

import jax
import numpy as np

GIB = 2**30

# HBM per chip (GiB), from the Cloud TPU system-architecture pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# name prefix -> (topology_desc generation, TensorCores per chip as the slice name counts them)
_GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5", 2), "v5e": ("v5e", 1), "v6e": ("v6e", 1)}
# Custom-call targets of fused kernels: Pallas/Mosaic on TPU, Triton and cuDNN attention on GPU.
_KERNEL_CALL = re.compile(
  r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton|'
  r'__cudnn\$fmha[^"]*)"'
)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its Cloud name, the ``get_topology_desc`` arguments and its chips' HBM."""

  name: str  # e.g. "v5p-128"
  generation: str  # "v4", "v5p", "v5e", "v6e"
  topology_name: str  # e.g. "v5:4x4x4"
  chip_config_name: str  # "megacore" (v4, v5p) or "default"
  chips_per_host_bounds: tuple[int, int, int]
  chips: int  # over all slices
  hbm_bytes: int  # per chip
  num_slices: int = 1


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _grid(chips: int, dims: int) -> list[int]:
  """The standard slice shape: start from 2x2(x1) and double the last smallest dimension."""
  if dims == 2 and chips == 1:
    return [1, 1]
  shape = [2, 2] + [1] * (dims - 2)
  while np.prod(shape) < chips:
    smallest = min(shape)
    shape[len(shape) - 1 - shape[::-1].index(smallest)] *= 2
  if np.prod(shape) != chips:
    raise ValueError(f"{chips} chips is not a standard slice size")
  return shape


def parse_topology(name: str) -> Topology:
  """``v5p-128`` (TensorCores, as Cloud names v4/v5p slices), ``v5e-8``/``v6e-8`` (chips);
  ``2xv5p-128`` is two such slices (multi-slice, joined over the data-centre network)."""
  match = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not match or match.group(1) == "0":
    raise ValueError(
      f"unknown TPU topology {name!r}; expected e.g. v5p-128, v4-256, v5e-8, "
      "v6e-16, or 2xv5p-128 for two slices"
    )
  slices = int(match.group(1) or 1)
  gen, count = match.group(2), int(match.group(3))
  desc_gen, cores = _GENERATIONS[gen]
  if count % cores:
    raise ValueError(f"{name}: {gen} slices are named by TensorCores, a multiple of {cores}")
  chips = count // cores
  shape = _grid(chips, 3 if cores == 2 else 2)
  if cores == 2:
    host = (2, 2, 1)
  else:
    host = (2, 4, 1) if chips >= 8 else (shape[0], shape[1], 1)
  return Topology(
    name=name,
    generation=gen,
    topology_name=f"{desc_gen}:" + "x".join(map(str, shape)),
    chip_config_name="megacore" if cores == 2 else "default",
    chips_per_host_bounds=host,
    chips=chips * slices,
    hbm_bytes=HBM_GIB[gen] * GIB,
    num_slices=slices,
  )


def devices(topology: Topology | str) -> list[Any]:
  """The slice's (compile-only) devices, one per chip."""
  from jax.experimental import topologies

  topo = parse_topology(topology) if isinstance(topology, str) else topology
  if not libtpu_available():
    raise RuntimeError("planning for a TPU needs libtpu: pip install 'jax[tpu]'")
  if jax.default_backend() != "tpu":
    # Compile-only use touches no chip, so libtpu's one-process-per-host lock does not apply
    # (and would stop two plans, or a plan next to a test run, from compiling at once).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(
    platform="tpu",
    topology_name=topo.topology_name,
    chip_config_name=topo.chip_config_name,
    chips_per_host_bounds=topo.chips_per_host_bounds,
    num_slices=topo.num_slices,
  )
  return list(desc.devices)


def make_mesh(topology: Topology | str, shape: Sequence[int]) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over the slice's chips (one entry may be -1)."""
  from astrollama_jax import sharding

  return sharding.make_mesh(shape, devices(topology))


def kernel_calls(hlo_text: str) -> int:
  """How many fused-kernel custom calls (Pallas TPU, Triton, cuDNN) a compiled HLO holds.

  Each call site counts once: a kernel inside a scanned layer body counts once, not per layer.
  """
  return len(_KERNEL_CALL.findall(hlo_text))


# libtpu's compile error for a plan over the chip's HBM (sizes in GiB, printed as "G").
_OUT_OF_HBM = re.compile(
  r"RESOURCE_EXHAUSTED: Ran out of memory.*?HLO temporaries "
  r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
  re.S,
)


def compile_plan(lowered: Any, hbm_bytes: int | None = None) -> dict[str, Any]:
  """Compile a lowered program (abstract arguments sharded over a slice's devices).

  Returns per-chip bytes (arguments, outputs, aliased, temporaries, generated code, peak =
  arguments + outputs - aliased + temporaries + code), whether the peak fits ``hbm_bytes``, the
  compile time and the fused-kernel count. A program libtpu refuses as larger than the chip
  comes back as ``fits: False`` with its temporaries, the HBM libtpu had available, and the
  error line (no argument/peak figures: the compiler stopped first).
  """
  t0 = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    too_big = _OUT_OF_HBM.search(str(e))
    if too_big is None:
      raise
    # libtpu refuses a program whose temporaries exceed the chip: that is the answer "no".
    return {
      "fits": False,
      "hbm_bytes": hbm_bytes,
      "compile_s": round(time.time() - t0, 1),
      "temp_bytes": int(float(too_big.group(1)) * GIB),
      "available_bytes": int(float(too_big.group(2)) * GIB),
      "error": str(e).strip().splitlines()[0],
    }
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  out = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "code_bytes": int(mem.generated_code_size_in_bytes),
  }
  out["peak_bytes"] = (
    out["argument_bytes"]
    + out["output_bytes"]
    - out["alias_bytes"]
    + out["temp_bytes"]
    + out["code_bytes"]
  )
  out["hbm_bytes"] = hbm_bytes
  out["fits"] = None if hbm_bytes is None else out["peak_bytes"] <= hbm_bytes
  out["compile_s"] = round(compile_s, 1)
  out["kernel_calls"] = kernel_calls(compiled.as_text())
  return out


def train_step_plan(config: Any, topology: Topology | str) -> dict[str, Any]:
  """The trainer's own train step (``train.program``) of a config, compiled by libtpu for
  ``topology`` on the config's mesh (-1 allowed) and sharding rules.

  The model policy is the config's; ``cudnn`` (a GPU kernel) and ``auto`` compile as splash.
  Nothing is allocated. The result's ``attention`` is the implementation compiled.
  """
  from astrollama_jax.model.attention import resolve_impl
  from astrollama_jax.train import program as program_lib
  from astrollama_jax.train import resolve

  topo = parse_topology(topology) if isinstance(topology, str) else topology
  cfg = resolve.preset_model_config(config)
  impl = resolve_impl("auto" if cfg.attention_impl == "cudnn" else cfg.attention_impl, "tpu")
  cfg = cfg.replace(attention_impl=impl)
  mesh = make_mesh(topo, tuple(config.mesh))
  resolve.check_batch_layout(config, dict(mesh.shape))
  program = program_lib.compile_train_step(
    config, mesh, cfg=cfg, compile=False, total_steps=config.train.num_steps or 1000
  )
  t = config.train
  return {
    "target": topo.name,
    "chips": topo.chips,
    "mesh": dict(mesh.shape),
    "model": config.model.preset,
    "attention": impl,
    "remat": cfg.remat_policy,
    "global_batch": t.global_batch_size,
    "seq_len": config.data.seq_len,
    "grad_accum": t.grad_accum_steps,
    **compile_plan(program.lowered, topo.hbm_bytes),
  }


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
  """The table of a plan (``train_step_plan``): (quantity, value) rows, sizes in GiB per chip."""
  gib = lambda key: f"{result[key] / GIB:.2f}" if key in result else "-"  # noqa: E731
  return [
    ("target / mesh", f"{result['target']} ({result['chips']} chips) / {result['mesh']}"),
    (
      "batch",
      f"{result['global_batch']} x {result['seq_len']} (accumulation {result['grad_accum']})",
    ),
    ("remat / attention", f"{result['remat']} / {result['attention']}"),
    ("arguments (GiB/chip)", gib("argument_bytes")),
    ("temporaries (GiB/chip)", gib("temp_bytes")),
    ("peak (GiB/chip)", gib("peak_bytes")),
    ("HBM (GiB/chip)", gib("hbm_bytes")),
    ("fits", str(result["fits"])),
    ("fused-kernel calls", str(result.get("kernel_calls", "-"))),
    ("compile (s)", str(result["compile_s"])),
  ]
