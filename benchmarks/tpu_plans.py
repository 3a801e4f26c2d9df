"""libtpu's per-chip memory plan of a config's train step on a TPU slice, one JSON line per plan.

  python benchmarks/tpu_plans.py --config=configs/llama2_cpt.py:7b --topology=v5p-8 \
      --config.mesh='(1,-1,1)' --seq_len=2048,4096 --attention=splash,xla

Each (attention, seq_len) pair compiles in this process, one after another; run one process at a
time unless ALLOW_MULTIPLE_LIBTPU_LOAD=1. No TPU is needed (``astrollama_jax.perf.tpu_plan``).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/*.py training config.")
flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v4-256, v5e-8.")
flags.DEFINE_list("seq_len", [], "Sequence lengths to plan (default: the config's).")
flags.DEFINE_list("attention", [], "Attention implementations to plan (default: the config's).")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from astrollama_jax.perf import tpu_plan

  config = FLAGS.config
  for seq in FLAGS.seq_len or [config.data.seq_len]:
    for impl in FLAGS.attention or [config.model.attention_impl]:
      config.data.seq_len = int(seq)
      config.model.attention_impl = impl
      print(json.dumps(tpu_plan.train_step_plan(config, FLAGS.topology)), flush=True)


if __name__ == "__main__":
  app.run(main)
