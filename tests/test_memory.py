"""Peak memory from /proc: a command's own peak is its own, a process tree's is summed."""

import os
import subprocess
import sys
import textwrap

from astrollama_jax.perf import memory

MIB = 1 << 20

_HOLD = textwrap.dedent(
  """
  import sys, time
  x = bytearray(int(sys.argv[1]) << 20)
  x[::4096] = b"\\1" * len(x[::4096])
  print("ready", flush=True)
  time.sleep(float(sys.argv[2]))
  """
)


def test_a_child_does_not_report_its_parents_peak():
  """getrusage's ru_maxrss of a child starts at the parent's peak; VmHWM does not."""
  big = bytearray(400 * MIB)
  big[::4096] = b"\1" * len(big[::4096])
  code = (
    "import resource; from astrollama_jax.perf import memory; "
    "print(memory.own_peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ)
  ).stdout
  own, inherited = (int(v) for v in out.split())
  del big
  assert 0 < own < 300 * MIB
  assert inherited >= 400 * MIB  # why the helper exists


def test_tree_sampler_sums_a_process_and_its_children():
  script = (
    "import subprocess, sys\n"
    f"hold = {_HOLD!r}\n"
    "kid = subprocess.Popen([sys.executable, '-c', hold, '120', '1.5'], stdout=subprocess.PIPE)\n"
    "assert kid.stdout.readline().startswith(b'ready')\n"
    "exec(compile(hold, 'hold', 'exec'), {'__name__': '__main__'})\n"
    "kid.wait()\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", script, "120", "1.0"], stdout=subprocess.PIPE, text=True
  )
  with memory.TreeSampler(proc.pid, interval=0.02) as sampler:
    proc.communicate(timeout=60)
  assert proc.returncode == 0
  assert sampler.samples > 3
  assert sampler.peak_rss_bytes >= 240 * MIB
  assert sampler.peaks["RssAnon"] >= 240 * MIB
  assert sampler.peaks["RssAnon"] + sampler.peaks["RssFile"] <= sampler.peak_rss_bytes + 8 * MIB
  assert len(sampler.cpu) >= 2 and all(v >= 0 for v in sampler.cpu.values())


def test_gone_processes_read_as_nothing():
  proc = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  pid = int(proc.stdout)
  assert memory.status(pid) == {} and memory.cpu_seconds(pid) == 0.0
  assert memory.process_tree(pid) == [pid]
