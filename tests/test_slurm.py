"""launch/slurm_gpu.sbatch under a real one-machine Slurm: preempted, requeued, resumed, finished.

The fixture starts munged, slurmctld and slurmd for this machine only (loopback, state and spool
folders in a temporary folder, root as SlurmUser) and stops them afterwards, also on failure.
Skipped where Slurm is not installed (``.ci/run`` installs ``slurm-wlm`` and ``munge``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

from helpers import REPO, free_port
from helpers_train import SYNTHETIC, records, train_env
import pytest

from astrollama_jax.train import exit_codes
from astrollama_jax.train.distributed import slurm_local_device_ids

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def _which(name: str) -> str:
  return shutil.which(name) or f"/usr/sbin/{name}"


def _conf(root, host: str) -> str:
  return f"""\
ClusterName=astrotest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  """SLURM_CONF of a running one-node cluster."""
  missing = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
  if missing:
    pytest.skip(
      f"Slurm is not installed (no {', '.join(missing)}; .ci/run installs slurm-wlm and munge)"
    )
  if os.geteuid() != 0:
    pytest.skip("the one-machine Slurm cluster runs its daemons as root")
  root = tmp_path_factory.mktemp("slurm")
  for d in ("state", "spool"):
    (root / d).mkdir()
  key = root / "munge.key"
  key.write_bytes(os.urandom(128))
  key.chmod(0o400)
  host = socket.gethostname().split(".")[0]
  conf = root / "slurm.conf"
  conf.write_text(_conf(root, host))
  env = dict(os.environ, SLURM_CONF=str(conf))
  daemons: list[subprocess.Popen] = []
  log = open(root / "daemons.log", "ab")

  def daemon(*cmd):
    daemons.append(
      subprocess.Popen([_which(cmd[0]), *cmd[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)
    )

  try:
    daemon(
      "munged",
      "-F",
      "-f",
      f"--socket={root}/munge.socket",
      f"--key-file={key}",
      f"--pid-file={root}/munged.pid",
      f"--seed-file={root}/munged.seed",
      f"--log-file={root}/munged.log",
    )
    _until(lambda: (root / "munge.socket").exists(), 30, "munged did not start", root)
    daemon("slurmctld", "-D", "-i", "-f", str(conf))
    daemon("slurmd", "-D", "-f", str(conf))
    _until(
      lambda: _sh(env, "sinfo", "-h", "-o", "%T").strip() == "idle",
      60,
      "the node did not come up idle",
      root,
    )
    yield env
  finally:
    subprocess.run(
      [_which("scancel"), "--full", "--user=root"], env=env, capture_output=True, timeout=30
    )
    for p in reversed(daemons):
      p.terminate()
    for p in reversed(daemons):
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=30)
    log.close()


def _sh(env, *cmd) -> str:
  out = subprocess.run(
    [_which(cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True, timeout=60
  )
  return out.stdout if out.returncode == 0 else ""


def _until(cond, timeout: float, what: str, root=None) -> None:
  end = time.time() + timeout
  while not cond():
    if time.time() > end:
      logs = (
        "".join(
          f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
          for p in sorted(root.glob("*.log"))
        )
        if root
        else ""
      )
      raise AssertionError(what + logs)
    time.sleep(0.2)


def _job(env, job: str) -> dict[str, str]:
  """``scontrol show job`` as key -> value (JobState, Restarts, ExitCode, ...)."""
  return dict(re.findall(r"(\w+)=(\S*)", _sh(env, "scontrol", "show", "job", "-o", job)))


def _task(localid: int, tasks_per_node: str, **extra: str) -> dict[str, str]:
  return {
    "SLURM_JOB_ID": "7",
    "SLURM_LOCALID": str(localid),
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
    **extra,
  }


def test_each_task_drives_its_share_of_the_node_gpus():
  eight = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}
  # One task per node (the sbatch script): all 8, where JAX alone would give [SLURM_LOCALID].
  assert slurm_local_device_ids(_task(0, "1(x4)", **eight)) == list(range(8))
  # One task per GPU, every task seeing all eight: one each.
  assert [slurm_local_device_ids(_task(i, "8(x2)", **eight)) for i in (0, 5)] == [[0], [5]]
  # Two tasks per node: four each; the node's own count is read from the compressed list.
  assert slurm_local_device_ids(_task(1, "4,2,1", **eight)) == [4, 5, 6, 7]
  # SLURM bound GPUs to tasks (--gpus-per-task, --gpu-bind): each drives all it sees.
  bound = {"CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_ON_NODE": "8"}
  assert slurm_local_device_ids(_task(3, "8", **bound)) == [0]
  assert slurm_local_device_ids(
    _task(1, "2", CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2", SLURM_GPUS_PER_TASK="2")
  ) == [0, 1]
  # No GPUs (CPU mode), outside SLURM, or an explicit choice: JAX decides.
  assert slurm_local_device_ids(_task(1, "2")) is None
  assert slurm_local_device_ids({"CUDA_VISIBLE_DEVICES": "0,1"}) is None
  assert slurm_local_device_ids(_task(0, "1", JAX_LOCAL_DEVICE_IDS="2", **eight)) is None
  with pytest.raises(ValueError, match="cannot be split evenly over its 3 Slurm tasks"):
    slurm_local_device_ids(_task(0, "3", **eight))


STEPS, EVERY = 60, 5


def test_a_preempted_job_requeues_itself_and_resumes_to_the_end(slurm, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "job.log"
  env = dict(slurm, **{k: v for k, v in train_env(1).items() if k.startswith(("JAX", "XLA", "TF"))})
  env.update(ASTROLLAMA_SLURM_CPU="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
  overrides = [
    *SYNTHETIC,
    f"--config.train.num_steps={STEPS}",
    f"--config.checkpoint.every={EVERY}",
    "--config.checkpoint.keep=20",
  ]
  submit = subprocess.run(
    [
      _which("sbatch"),
      "--parsable",
      "--nodes=1",
      "--ntasks-per-node=2",
      "--cpus-per-task=1",
      "--gpus-per-node=0",
      "--time=15",
      f"--output={log}",
      "launch/slurm_gpu.sbatch",
      "configs/demo.py",
      str(workdir),
      *overrides,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert submit.returncode == 0, submit.stderr
  job = submit.stdout.strip().split(";")[0]
  text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731

  # After the first checkpoint, the signal SLURM sends before the time limit (or on preemption).
  _until(
    lambda: (
      (workdir / "checkpoints" / str(EVERY)).is_dir()
      or _job(slurm, job).get("JobState") not in ("PENDING", "RUNNING")
    ),
    300,
    f"no first checkpoint; job log:\n{text()[-4000:]}",
  )
  assert _job(slurm, job)["JobState"] == "RUNNING", text()[-4000:]
  signal = subprocess.run([_which("scancel"), "--signal=TERM", job], env=slurm, timeout=60)
  assert signal.returncode == 0
  # The tasks save and exit 75, the batch script requeues the job: it waits for its begin time.
  _until(
    lambda: _job(slurm, job).get("Restarts") == "1" and _job(slurm, job)["JobState"] == "PENDING",
    240,
    f"the job did not requeue itself; job log:\n{text()[-4000:]}",
  )
  preempted_at = max(r["step"] for r in records(workdir, "train"))
  assert preempted_at < STEPS and (workdir / "checkpoints" / str(preempted_at)).is_dir()
  # Before the restart: the node done with the old run, and a new second. slurmd refuses a
  # launch whose credential dates from the second the requeue revoked the old one ("Job
  # credential revoked"), which SLURM's 120 s requeue delay normally rules out.
  _until(
    lambda: _sh(slurm, "sinfo", "-h", "-o", "%T").strip() == "idle",
    120,
    "the node did not go idle after the requeue",
  )
  time.sleep(2)
  subprocess.run(
    [_which("scontrol"), "update", f"JobId={job}", "StartTime=now"],
    env=slurm,
    check=True,
    timeout=60,
  )  # skip SLURM's requeue delay (BeginTime = now + 120 s)
  _until(
    lambda: (
      _job(slurm, job).get("JobState") not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", None)
    ),
    300,
    f"the restarted job did not end; job log:\n{text()[-4000:]}",
  )
  info, out = _job(slurm, job), text()
  assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-4000:])

  assert f"trainer exit status {exit_codes.PREEMPTED}" in out and "requeueing job" in out
  assert "restart 1," in out and "trainer exit status 0" in out
  assert f"resumed from {workdir}/checkpoints/{preempted_at}" in out
  summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
  assert summary["resumed_from"] == preempted_at and summary["final_step"] == STEPS
  steps = [r["step"] for r in records(workdir, "train")]
  assert steps == list(range(1, STEPS + 1)), "a clean preemption loses no step and repeats none"
