"""The launchers' exit-status contract, with stand-ins for ssh, gcloud and the trainer.

Each launcher exits with the highest status of its processes (``exit_codes.PREEMPTED``: stopped
after saving, ``exit_codes.HUNG``), and the plain multi-host one forwards its own SIGTERM to the
trainers (not merely to ssh), so they checkpoint and exit ``PREEMPTED``.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from helpers import REPO

from astrollama_jax.train import exit_codes

# Stands in for `python -m astrollama_jax train ...`: exits FAKE_RC_<process id> (default 0), or 75
# on SIGTERM (as the trainer does after its checkpoint), after WAIT seconds.
TRAINER = """#!/usr/bin/env bash
id=${FAKE_ID:-0}
for a; do case $a in --process_id=*) id=${a#*=};; --workdir=*) w=${a#*=};; esac; done
trap 'echo "term $id" >> "$w/events"; exit 75' TERM
echo "started $id $*" >> "$w/events"
sleep "${WAIT:-0}" & wait
rc=FAKE_RC_$id
exit "${!rc:-0}"
"""
SSH = """#!/usr/bin/env bash
shift  # the host: every "host" is this machine
exec bash -c "$1"
"""
GCLOUD = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 != --command ]]; do shift; done
for id in 0 1; do FAKE_ID=$id bash -c "$2" & done
wait
"""


def _tools(tmp_path) -> dict[str, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("trainer", TRAINER), ("ssh", SSH), ("gcloud", GCLOUD)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  (tmp_path / "run").mkdir()
  return dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    PYTHON=str(bin_dir / "trainer"),
    TMPDIR=str(tmp_path),
    REPO_DIR=str(REPO),
  )


def _events(tmp_path) -> list[str]:
  path = tmp_path / "run" / "events"
  return path.read_text().splitlines() if path.exists() else []


def test_multihost_exits_with_the_highest_status(tmp_path):
  env = _tools(tmp_path)
  env.update(HOSTS="a,b", FAKE_RC_1=str(exit_codes.HUNG))
  out = subprocess.run(
    [
      "bash",
      str(REPO / "launch/gpu_multihost.sh"),
      "configs/demo.py",
      str(tmp_path / "run"),
      "--config.seed=1",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == exit_codes.HUNG, out.stderr
  started = sorted(e for e in _events(tmp_path) if e.startswith("started"))
  assert [e.split()[1] for e in started] == ["0", "1"]
  assert all(
    "--coordinator_address=a:12355 --num_processes=2" in e and e.endswith("--config.seed=1")
    for e in started
  )


def test_multihost_forwards_sigterm_to_the_trainers_and_exits_preempted(tmp_path):
  env = _tools(tmp_path)
  env.update(HOSTS="a,b", WAIT="60")
  proc = subprocess.Popen(
    ["bash", str(REPO / "launch/gpu_multihost.sh"), "configs/demo.py", str(tmp_path / "run")],
    cwd=tmp_path,
    env=env,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    end = time.time() + 30
    while len(_events(tmp_path)) < 2:
      assert time.time() < end and proc.poll() is None
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == exit_codes.PREEMPTED, err
  assert sorted(e for e in _events(tmp_path) if e.startswith("term")) == ["term 0", "term 1"]


def test_tpu_pod_exits_with_the_highest_worker_status(tmp_path):
  env = _tools(tmp_path)
  for rcs, want in (
    ((0, 0), 0),
    ((exit_codes.PREEMPTED, 0), exit_codes.PREEMPTED),
    ((exit_codes.PREEMPTED, exit_codes.HUNG), exit_codes.HUNG),
  ):
    env.update(FAKE_RC_0=str(rcs[0]), FAKE_RC_1=str(rcs[1]), LOG=str(tmp_path / f"tpu{want}.log"))
    out = subprocess.run(
      [
        "bash",
        str(REPO / "launch/tpu_pod.sh"),
        "pod",
        "zone",
        "configs/demo.py",
        str(tmp_path / "run"),
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert out.returncode == want, (rcs, out.stdout, out.stderr)


def test_the_exit_code_table_is_the_one_source_the_sbatch_script_reads():
  codes = {v for k, v in vars(exit_codes).items() if k.isupper() and isinstance(v, int)}
  assert set(exit_codes.MEANINGS) == codes and set(exit_codes.REQUEUE) <= codes
  out = subprocess.run(
    [sys.executable, "-m", "astrollama_jax.train.exit_codes", "requeue"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert out.stdout.split() == [str(c) for c in exit_codes.REQUEUE]
  assert "astrollama_jax.train.exit_codes requeue" in (REPO / "launch/slurm_gpu.sbatch").read_text()
