"""Runs test cases in a fresh Python process with N forced CPU devices.

The pytest process has already initialized JAX with one CPU device, and the device count
cannot change afterwards, so multi-device cases run in a subprocess: a test module calls
``run(__file__, "case_name", devices=8)`` and ends with ``main()``, which runs the named
function when the module is executed as a script.
"""
import os
import re
import subprocess
import sys

import jax_deepgemm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(jax_deepgemm.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def env(devices=None, **extra):
  """The environment of a child: this jax_deepgemm first on the path, ``devices`` CPUs."""
  e = dict(os.environ)
  # The child must import the same jax_deepgemm as this process (a source tree or the
  # installed package), and find the test helpers.
  e["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + [p for p in [e.get("PYTHONPATH")] if p])
  if devices:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", e.get("XLA_FLAGS", ""))
    e["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  e["JAX_PLATFORMS"] = "cpu"
  e.update({k: str(v) for k, v in extra.items()})
  return e


def run(module_file, case, *args, devices=8, timeout=300):
  """Runs ``case(*args)`` of ``module_file`` in a child with ``devices`` CPU devices."""
  proc = subprocess.run([sys.executable, module_file, case, *map(str, args)], env=env(devices),
                        capture_output=True, text=True, timeout=timeout, cwd=TESTS)
  assert proc.returncode == 0, (
      f"{case}{args} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
  return proc.stdout


def main(namespace):
  """``python <test module> case [args...]``: runs the case (called by ``run``)."""
  case, *args = sys.argv[1:]
  namespace[case](*args)


def collectives(hlo: str) -> dict:
  """How many of each collective the compiled HLO text runs (async ones counted once)."""
  return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
