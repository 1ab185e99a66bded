"""Shared timing, result-file and table helpers for the jax_deepgemm benchmarks.

Timing method (``bench``)
-------------------------
We want the device time of one call of an op whose operands come from HBM, not from L2
(H100: 50 MB, H200: 60 MB) and not from a cache warmed by the previous call.

1. ``make_inputs(key)`` builds one input set (random data, made on the device). We build
   ``n_rot`` independent sets, enough that together they hold at least ``rotate_bytes``
   (default 512 MiB, several times L2) and at least 2 of them.
2. One jitted function runs the op once on every set, as an unrolled Python loop over
   distinct arguments, and returns every output. Nothing is stacked, sliced or scanned,
   so XLA compiles each op exactly as it would alone; returning the full outputs keeps
   XLA from narrowing the work (no slicing of results). Between two uses of one set the
   device touches all the other sets, so every op reads its operands from HBM.
   XLA runs these independent ops one after another on its single compute stream.
3. After compilation and ``warmup`` calls we time, with ``time.perf_counter``, a burst of
   ``inner`` back-to-back calls ended by ``jax.block_until_ready``. Dispatch is
   asynchronous, so host overhead overlaps device work as long as one call's device time
   (at least the time to read ``rotate_bytes`` from HBM, ~0.1 ms) exceeds the host's
   per-call dispatch cost. ``inner`` is picked so that ``iters`` bursts take about
   ``min_time_s`` in total.
4. Per-op time = burst time / (inner * n_rot). We report the median over the ``iters``
   bursts (plus min/max). The only non-device time left in a burst is one launch latency
   and one synchronisation, spread over inner * n_rot ops.

While the timed bursts run, ``nvidia-smi`` samples the GPU's SM clock and board power
(``ClockSampler``): Hopper's FP8 tensor cores draw enough power that the clock sags under
load, so TFLOPS figures of different runs or GPUs (DeepGEMM's H800 figures) compare per
clock. The medians land in each record as ``sm_clock_mhz`` and ``power_w`` (None where
there is no ``nvidia-smi`` or the bursts were too short to be sampled). Where the driver
reports them, the record also says why the clock was where it was: ``clock_reasons`` (the
share of samples in which each of NVML's clock event reasons was active, e.g.
``sw_power_cap``, ``hw_thermal_slowdown``), ``gpu_temp_c`` and ``power_limit_w`` (the enforced
board power limit). A clock well below the maximum with no power cap, no thermal reason and a
draw well under the limit points at the machine's settings, not at the kernel.

We check for host-bound runs: if dispatching a few calls takes nearly as long as
executing them, the device was waiting on Python, and we double ``n_rot`` (up to
``max_rot``) and measure again; if it is still host bound the result says so
(``Timing.host_bound``), and a warning is printed.

Result files (``write_results``)
--------------------------------
``benchmarks/results/<name>.json`` is a JSON list of flat records. Writing replaces the
records of the devices being written and keeps the others, so results of an H100 and an
H200 live side by side. Record keys: ``op, impl, m, n, k, groups, device, run_id,
time_us, tflops, gbps`` plus free-form extras (``config``, ``ratio_vs_xla_fp8``,
``ratio_vs_xla_bf16``, ``diff``, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

# Every benchmark imports this module first: from a source checkout without the package
# installed, fall back to the repository's jax_deepgemm.
try:
  import jax_deepgemm  # noqa: F401
except ImportError:
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ROTATE_BYTES = 512 << 20  # > 8x the L2 of an H100 (50 MB) or an H200 (60 MB)
DEFAULT_MAX_ROT = 64

RECORD_KEYS = ("op", "impl", "m", "n", "k", "groups", "device", "run_id", "time_us", "tflops",
               "gbps")


# --------------------------------------------------------------------------- device info

def device_name() -> str:
  """``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``."""
  return jax.devices()[0].device_kind


@functools.lru_cache(maxsize=None)
def run_id() -> str:
  """A UTC timestamp, made once per process, that tags every record of this run."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
  """Per-call device time of one op. ``float(t)`` is the median in microseconds."""
  time_us: float          # median over bursts
  min_us: float
  max_us: float
  n_rot: int              # independent input sets rotated through
  inner: int              # calls per timed burst
  iters: int              # timed bursts
  set_bytes: int          # bytes of one input set
  host_bound: bool        # dispatch could not keep the device busy
  sm_clock_mhz: float | None = None  # median SM clock while the bursts ran
  power_w: float | None = None       # median board power while the bursts ran
  # Why the clock was where it was (ClockSampler.parse_details), where the driver says.
  clock_details: dict | None = None

  def __float__(self) -> float:
    return self.time_us

  def extras(self) -> dict:
    """Fields worth keeping in a result record."""
    return {"min_us": self.min_us, "n_rot": self.n_rot, "host_bound": self.host_bound,
            "sm_clock_mhz": self.sm_clock_mhz, "power_w": self.power_w,
            **(self.clock_details or {})}


@contextlib.contextmanager
def _sigint_default_in_children():
  """``stop()`` ends the sampler with SIGINT. A benchmark started as a background job (``cmd &``
  in a script) has SIGINT ignored, and an ignored signal stays ignored across exec: the sampler
  would then be killed instead, losing its buffered samples. A handler, unlike SIG_IGN, is reset
  to the default at exec, so hold one while the child starts."""
  try:
    old = signal.getsignal(signal.SIGINT)
    if old is signal.SIG_IGN:
      signal.signal(signal.SIGINT, signal.default_int_handler)
  except ValueError:  # not the main thread: leave it
    old = None
  try:
    yield
  finally:
    if old is signal.SIG_IGN:
      signal.signal(signal.SIGINT, old)


class ClockSampler:
  """Samples SM clock (MHz) and power (W) of the benchmarked GPU with ``nvidia-smi -lms``.

  ``start()`` launches the sampler (a no-op off GPUs or without nvidia-smi);
  ``window()`` opens and closes the span whose samples count; ``stop()`` returns the
  medians ``(clock, power)`` of the samples taken inside the span, or Nones, and leaves
  ``details`` (``parse_details``: why the clock was where it was) where the driver has the
  fields. nvidia-smi takes a fraction of a second to start, so start it before the warm-up.
  """

  FIELDS = ("timestamp", "clocks.sm", "power.draw")
  # Asked for where the driver knows them (older ones call the first clocks_throttle_reasons).
  DETAIL_FIELDS = ("clocks_event_reasons.active", "temperature.gpu", "enforced.power.limit")
  # NVML's clock event reason bits (nvmlClocksEventReason*).
  REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
             0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
             0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
             0x100: "display_clock_setting"}
  _detail_support: dict = {}  # (nvidia-smi, GPU index) -> whether it answers DETAIL_FIELDS

  def __init__(self, interval_ms: int = 50, command: str = "nvidia-smi"):
    self.interval_ms = interval_ms
    self.command = command
    self.proc = None
    self.span = None
    self.details = None

  def _gpu_index(self) -> str | None:
    dev = jax.devices()[0]
    if dev.platform != "gpu":
      return None
    idx = str(getattr(dev, "local_hardware_id", None) or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:  # jax's ids count the visible devices; nvidia-smi's all of them
      ids = [v.strip() for v in visible.split(",") if v.strip()]
      idx = ids[int(idx)] if int(idx) < len(ids) else idx
    return idx

  def _fields(self, exe: str, idx: str) -> tuple[str, ...]:
    """FIELDS plus DETAIL_FIELDS where this nvidia-smi answers them (it rejects a whole
    query that names a field it does not know), asked once per process."""
    key = (exe, idx)
    if key not in ClockSampler._detail_support:
      try:
        r = subprocess.run([exe, "-i", idx, "--query-gpu=" + ",".join(self.DETAIL_FIELDS),
                            "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=10)
        ClockSampler._detail_support[key] = r.returncode == 0
      except (OSError, subprocess.TimeoutExpired):
        ClockSampler._detail_support[key] = False
    return self.FIELDS + (self.DETAIL_FIELDS if ClockSampler._detail_support[key] else ())

  def start(self) -> "ClockSampler":
    try:
      idx = self._gpu_index()
      exe = shutil.which(self.command)
      if idx is not None and exe is not None:
        cmd = [exe, "-i", idx, "--query-gpu=" + ",".join(self._fields(exe, idx)),
               "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)]
        # Into a pipe its stdout is block-buffered: line-buffer it, so that no sample
        # is lost when it is stopped.
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
          cmd = [stdbuf, "-oL", *cmd]
        with _sigint_default_in_children():
          self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
    except (OSError, ValueError):  # measuring clocks must never break a benchmark
      self.proc = None
    return self

  def window(self, begin: bool) -> None:
    now = datetime.datetime.now()
    self.span = (now, now) if begin or self.span is None else (self.span[0], now)

  @staticmethod
  def _samples(text: str, span):
    """The rows of ``text`` stamped inside ``span``: (timestamp, clock, other columns)."""
    for line in text.splitlines():
      parts = [p.strip() for p in line.split(",")]
      if len(parts) < 3:
        continue
      try:
        ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        clock = float(parts[1])
      except ValueError:
        continue  # a header, "[N/A]" and the like
      if span is not None and not span[0] <= ts <= span[1]:
        continue
      yield clock, parts[2:]

  @staticmethod
  def _float(text: str) -> float | None:
    try:
      return float(text)
    except ValueError:
      return None

  @staticmethod
  def parse(text: str, span) -> tuple[float | None, float | None]:
    clocks, powers = [], []
    for clock, rest in ClockSampler._samples(text, span):
      clocks.append(clock)
      power = ClockSampler._float(rest[0])
      if power is not None:
        powers.append(power)
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return med(clocks), med(powers)

  @classmethod
  def parse_details(cls, text: str, span) -> dict | None:
    """From rows with DETAIL_FIELDS: ``clock_reasons`` (reason -> share of the samples in
    which it was active), ``gpu_temp_c`` and ``power_limit_w`` (medians); None without."""
    n, counts, temps, limits = 0, {}, [], []
    for _, rest in cls._samples(text, span):
      if len(rest) < 4:
        continue
      try:
        mask = int(rest[1], 16)
      except ValueError:
        continue
      n += 1
      for bit, name in cls.REASONS.items():
        if mask & bit:
          counts[name] = counts.get(name, 0) + 1
      for value, into in ((cls._float(rest[2]), temps), (cls._float(rest[3]), limits)):
        if value is not None:
          into.append(value)
    if not n:
      return None
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return {"clock_reasons": {k: round(v / n, 3) for k, v in sorted(counts.items())},
            "gpu_temp_c": med(temps), "power_limit_w": med(limits)}

  def stop(self) -> tuple[float | None, float | None]:
    if self.proc is None:
      return None, None
    self.proc.send_signal(signal.SIGINT)  # nvidia-smi's loop ends cleanly on Ctrl-C
    try:
      out, _ = self.proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      out, _ = self.proc.communicate()
    self.proc = None
    self.details = self.parse_details(out or "", self.span)
    return self.parse(out or "", self.span)


def tree_nbytes(tree) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))


def _burst(call, sets, inner: int) -> tuple[float, float]:
  """Runs ``inner`` calls back to back; returns (dispatch seconds, total seconds)."""
  t0 = time.perf_counter()
  out = None
  for _ in range(inner):
    out = call(sets)
  t1 = time.perf_counter()
  jax.block_until_ready(out)
  return t1 - t0, time.perf_counter() - t0


def bench(fn: Callable, make_inputs: Callable[[jax.Array], Sequence[Any]], *,
          warmup: int = 3, iters: int = 25, min_time_s: float = 1.0,
          rotate_bytes: int = DEFAULT_ROTATE_BYTES, max_rot: int = DEFAULT_MAX_ROT,
          n_rot: int | None = None, seed: int = 0) -> Timing:
  """Median per-call device time of ``fn(*make_inputs(key))`` (see the module docstring).

  Args:
    fn: the op, called as ``fn(*inputs)``; traced inside one ``jax.jit``.
    make_inputs: ``key -> tuple of arrays``: one independent random input set.
    warmup: untimed calls after compilation.
    iters: timed bursts; the median over them is reported.
    min_time_s: about how long all timed bursts take together.
    rotate_bytes: input sets are added until together they hold this many bytes.
    max_rot: most input sets; ``n_rot`` forces a count.
    seed: base PRNG seed; set ``i`` uses ``fold_in(key(seed), i)``.
  """
  base = jax.random.PRNGKey(seed)
  sets = [tuple(make_inputs(jax.random.fold_in(base, 0)))]
  jax.block_until_ready(sets)
  set_bytes = max(1, tree_nbytes(sets[0]))
  adaptive = n_rot is None
  if adaptive:
    n_rot = min(max(2, math.ceil(rotate_bytes / set_bytes)), max(2, max_rot))

  while True:
    while len(sets) < n_rot:
      sets.append(tuple(make_inputs(jax.random.fold_in(base, len(sets)))))
    jax.block_until_ready(sets)

    call = jax.jit(lambda s: [fn(*args) for args in s])
    jax.block_until_ready(call(sets))  # compile
    sampler = ClockSampler().start()
    for _ in range(warmup):
      jax.block_until_ready(call(sets))

    # Calibrate, and detect host-bound dispatch with a short burst (fewer calls than the
    # runtime lets be in flight, so dispatch itself never waits on the device here).
    probe = 8
    disp, total = _burst(call, sets, probe)
    per_call = total / probe
    # (On the CPU backend the "device" is the host itself: nothing to detect.)
    host_bound = jax.devices()[0].platform != "cpu" and disp > 0.8 * total
    if host_bound and adaptive and n_rot < max_rot:
      sampler.stop()
      n_rot = min(max_rot, 2 * n_rot)  # more device work per call; measure again
      continue
    break

  inner = max(1, min(10_000, math.ceil(min_time_s / max(iters, 1) / max(per_call, 1e-9))))
  times = []
  sampler.window(begin=True)
  for _ in range(iters):
    _, total = _burst(call, sets, inner)
    times.append(total / (inner * n_rot) * 1e6)
  sampler.window(begin=False)
  clock, power = sampler.stop()
  if host_bound:
    print(f"warning: host-bound timing ({n_rot} input sets of {set_bytes / 1e6:.1f} MB): the "
          "device time is probably lower than reported", file=sys.stderr)
  return Timing(time_us=statistics.median(times), min_us=min(times), max_us=max(times),
                n_rot=n_rot, inner=inner, iters=iters, set_bytes=set_bytes,
                host_bound=host_bound, sm_clock_mhz=clock, power_w=power,
                clock_details=sampler.details)


@dataclasses.dataclass
class KernelTimes:
  """Device time of one op from a profiler (CUPTI) trace: what its kernels ran for.

  ``bench`` times bursts on the host clock; at small sizes (M = 128) a call's device
  work is shorter than the host's dispatch of it and the gaps between kernels count.
  This is the time the GPU spent in the op's kernels alone (DeepGEMM's figures are
  such kernel times), summed over every kernel one call runs.
  """
  total_us: float                # mean over calls of the summed kernel time of one call
  kernels: dict[str, float]      # kernel name -> median microseconds per launch
  launches_per_call: float
  per_call_us: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> us per call
  # GPU idle time per call between its kernels (launch gaps, waits on the host), where known.
  gap_us: float | None = None

  def extras(self) -> dict:
    # kernel_breakdown_us is per launch; kernel_per_call_us sums a kernel's launches in one
    # call (fp8_linear's step runs the same GEMM kernel for the forward and for dgrad).
    out = {"kernel_us": self.total_us, "kernels_per_call": self.launches_per_call,
           "kernel_breakdown_us": self.kernels, "kernel_per_call_us": self.per_call_us}
    if self.gap_us is not None:
      out["kernel_gap_us"] = self.gap_us
    return out

  def chill_extras(self, chill_gb: float, flops: float) -> dict:
    """Record fields of these times taken under DeepGEMM's protocol (``chill_bytes``)."""
    return {"kernel_us_chill": self.total_us, "chill_gb": chill_gb,
            "tflops_kernel_chill": tflops(flops, self.total_us)}

  def top(self, n: int = 12) -> list[tuple[str, float]]:
    """The ``n`` kernels that take the most time per call: (name, us per call)."""
    return sorted(self.per_call_us.items(), key=lambda kv: -kv[1])[:n]


def _trace_events(trace_dir: str) -> list[tuple[str, float, float]] | None:
  """(name, duration in us, start in us) of every event on the GPU streams of a trace, or None."""
  import glob
  from jax.profiler import ProfileData  # jax >= 0.4.36
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return None
  events = []
  for plane in ProfileData.from_file(paths[0]).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    lines = list(plane.lines)
    streams = [ln for ln in lines if "Stream" in ln.name] or lines
    for ln in streams:
      for ev in ln.events:
        if not ev.name.startswith(("Memcpy", "Memset")):
          events.append((ev.name, ev.duration_ns / 1e3, ev.start_ns / 1e3))
  return events


def inner_gaps_us(events: Sequence[tuple[str, float, float]], runs: int) -> float:
  """GPU idle time between the kernels of ``runs`` dispatches, each waited for before the
  next: all gaps between consecutive kernels (overlaps count as none) but the ``runs - 1``
  largest, which are the host's wait and re-dispatch between runs."""
  spans = sorted((start, start + us) for _, us, start in events)
  gaps, end = [], spans[0][1] if spans else 0.0
  for start, stop in spans[1:]:
    gaps.append(max(0.0, start - end))
    end = max(end, stop)
  gaps.sort()
  return sum(gaps[:max(0, len(gaps) - (runs - 1))])


def _profile(run: Callable[[], Any], reps: int) -> list[tuple[str, float, float]] | None:
  """GPU events of ``reps`` calls of ``run()`` under ``jax.profiler`` (None without CUPTI)."""
  try:
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d):
        for _ in range(reps):
          run()
      return _trace_events(d)
  except (ImportError, RuntimeError, OSError) as e:  # no CUPTI: keep the benchmark going
    print(f"warning: no kernel times ({e})", file=sys.stderr)
    return None


def _check_no_clash(op_names: Iterable[str], fill_names: Iterable[str]) -> None:
  """Raises if a fill kernel bears one of the op's kernel names: a chilled trace could not
  tell the two apart."""
  clash = set(op_names) & set(fill_names)
  if clash:
    raise ValueError(f"the fill's kernels {sorted(clash)} are also the op's: chilled kernel "
                     "times cannot tell them apart")


def op_events(events: Sequence[tuple[str, float, float]], op_names: Iterable[str],
              fill_names: Iterable[str]) -> list[tuple[str, float, float]]:
  """The op's events of a chilled trace: those named as the op's kernels (``op_names``, from a
  profile of the op's own executable without fills). Raises if a fill kernel bears one of
  those names (``_check_no_clash``)."""
  op_names = set(op_names)
  _check_no_clash(op_names, fill_names)
  return [ev for ev in events if ev[0] in op_names]


def kernel_times(fn: Callable, make_inputs: Callable[[jax.Array], Sequence[Any]], *,
                 n_sets: int = 16, reps: int = 10, seed: int = 0,
                 chill_bytes: int = 0) -> KernelTimes | None:
  """Kernel time per call of ``fn(*make_inputs(key))`` on the GPU (None elsewhere, or
  when the profiler gives no GPU events): ``reps`` calls of one jitted function that
  runs the op on ``n_sets`` distinct input sets, traced with ``jax.profiler``.

  ``chill_bytes``: DeepGEMM's protocol (``bench_kineto``) instead. Every call is preceded
  by filling (writing) that many bytes, so the GPU spends most of the time in a memory-bound
  fill and each GEMM starts at a high clock rather than at the power cap of back-to-back
  GEMMs; calls run one at a time, and only the op's kernels count: the kernels that the op's
  own executable (``jax.jit(fn)``, the one the chilled calls run) launches in a plain profile.
  (Names taken from another executable, e.g. the jit of ``n_sets`` calls that the plain
  kernel times run, need not match: XLA names and fuses the kernels of each module anew.)
  """
  if jax.devices()[0].platform != "gpu":
    return None
  base = jax.random.PRNGKey(seed)
  sets = [tuple(make_inputs(jax.random.fold_in(base, i))) for i in range(n_sets)]
  op_names = fill_names = None
  if chill_bytes:
    # Two executables per call, dispatched in order onto the same stream: the fill, then
    # the op (one jitted function would let XLA schedule them in either order). The fill
    # is an iota, not zeros: an op that zero-fills its output runs a kernel of the same
    # name as a zeros fill (the K-grouped GEMM does), and would count the fill.
    fill_fn = jax.jit(lambda: jax.lax.iota(jnp.int32, max(1, chill_bytes // 4)))
    op = jax.jit(fn)

    def op_alone():
      out = None
      for args in sets:
        out = op(*args)
      jax.block_until_ready(out)
    op_alone()  # (compiles)
    op_names = {ev[0] for ev in _profile(op_alone, 1) or []}
    fill_names = {ev[0] for ev in _profile(lambda: jax.block_until_ready(fill_fn()), 1) or []}
    _check_no_clash(op_names, fill_names)  # (fails before the timed runs)

    def run():
      for args in sets:
        fill = fill_fn()
        out = op(*args)
        del fill  # (freed once done, before the next call's fill is allocated)
      jax.block_until_ready(out)
  else:
    call = jax.jit(lambda s: [fn(*args) for args in s])

    def run():
      jax.block_until_ready(call(sets))
  for _ in range(3):
    run()
  events = _profile(run, reps)
  if chill_bytes:
    events = op_events(events or [], op_names, fill_names)
  if not events:
    return None
  calls = reps * n_sets
  by_name: dict[str, list[float]] = {}
  for name, us, _ in events:
    by_name.setdefault(name, []).append(us)
  # (Under the chill protocol the fills sit between the op's calls: no gaps to speak of.)
  gap = None if chill_bytes else inner_gaps_us(events, reps) / calls
  return KernelTimes(total_us=sum(ev[1] for ev in events) / calls,
                     kernels={k: statistics.median(v) for k, v in by_name.items()},
                     launches_per_call=len(events) / calls,
                     per_call_us={k: sum(v) / calls for k, v in by_name.items()}, gap_us=gap)


# --------------------------------------------------------------------------- flags

def add_timing_args(p, *, iters: int = 25, min_time_s: float = 1.0) -> None:
  """The timing flags every benchmark takes (``--iters``, ``--min-time``, ``--rotate-mb``)."""
  p.add_argument("--iters", type=int, default=None,
                 help=f"timed bursts (median taken; default {iters})")
  p.add_argument("--min-time", type=float, default=None,
                 help=f"seconds of timing per implementation (default {min_time_s:g})")
  p.add_argument("--rotate-mb", type=float, default=None,
                 help="MB of rotating input sets per implementation (default 512; must exceed L2)")


def timing_from_args(args, *, warmup: int = 3, iters: int = 25, min_time_s: float = 1.0) -> dict:
  """``bench`` keyword arguments from the timing flags and ``--quick`` (tiny, for CPU smoke runs)."""
  timing = dict(warmup=warmup, iters=iters, min_time_s=min_time_s,
                rotate_bytes=DEFAULT_ROTATE_BYTES, max_rot=DEFAULT_MAX_ROT)
  if getattr(args, "quick", False):
    timing.update(warmup=1, iters=3, min_time_s=0.05, rotate_bytes=0, max_rot=2)
  if args.iters is not None:
    timing["iters"] = max(1, args.iters)
  if args.min_time is not None:
    timing["min_time_s"] = args.min_time
  if args.rotate_mb is not None:
    timing["rotate_bytes"] = int(args.rotate_mb * 1e6)
  return timing


def tflops(flops: float, time_us: float) -> float:
  return flops / (time_us * 1e-6) / 1e12 if time_us > 0 else float("nan")


def mhz(t: Timing | None) -> str:
  """The SM clock a timing ran at, for printing ("-" where unknown)."""
  return f"{t.sm_clock_mhz:.0f}" if t is not None and t.sm_clock_mhz is not None else "-"


def per_clock(tflops_: float | None, t: Timing | None) -> str:
  """``tflops_`` as a percentage of the FP8 peak at the clock ``t`` ran at ("-" if unknown)."""
  frac = peak_frac(tflops_, t.sm_clock_mhz if t is not None else None, hopper_sm_count())
  return f"{100 * frac:.0f}%" if frac is not None else "-"


def watts(t: Timing | None) -> str:
  """The board power a timing ran at, for printing ("-" where unknown)."""
  return f"{t.power_w:.0f}" if t is not None and t.power_w is not None else "-"


# Dense FP8 tensor-core FLOPs per clock of one Hopper SM (H100 SXM: 1979 TFLOPS =
# 132 SMs x 8192 x 1.83 GHz). The H200 runs FP8 GEMMs at its power cap, where the clock
# varies with the kernel (1.4-1.7 GHz), so compare kernels per clock.
FP8_FLOPS_PER_CLOCK_PER_SM = 8192


def peak_frac(tflops_: float | None, clock_mhz: float | None, num_sms: int | None) -> float | None:
  """``tflops_`` as a fraction of the Hopper FP8 peak at ``clock_mhz`` (None if unknown)."""
  if not tflops_ or not clock_mhz or not num_sms:
    return None
  return tflops_ * 1e12 / (FP8_FLOPS_PER_CLOCK_PER_SM * num_sms * clock_mhz * 1e6)


@functools.lru_cache(maxsize=None)
def hopper_sm_count() -> int | None:
  """SM count of the benchmarked GPU if it is a Hopper (sm_90) one, else None."""
  dev = jax.devices()[0]
  if dev.platform != "gpu" or str(getattr(dev, "compute_capability", "")) != "9.0":
    return None
  count = getattr(dev, "core_count", None)
  return int(count) if count else None


def gbps(nbytes: float, time_us: float) -> float:
  return nbytes / (time_us * 1e-6) / 1e9 if time_us > 0 else float("nan")


def compiled_hlo(fn: Callable, *args) -> str:
  """The optimized HLO text XLA compiles ``jax.jit(fn)(*args)`` to."""
  return jax.jit(fn).lower(*args).compile().as_text()


# --------------------------------------------------------------------------- results

def make_record(*, op: str, impl: str, m: int, n: int, k: int, groups: int | None = None,
                time_us: float, flops: float, nbytes: float, **extras) -> dict:
  rec = {"op": op, "impl": impl, "m": m, "n": n, "k": k, "groups": groups,
         "device": device_name(), "run_id": run_id(), "time_us": time_us,
         "tflops": tflops(flops, time_us), "gbps": gbps(nbytes, time_us)}
  rec.update(extras)
  # Work per clock: the fraction of the FP8 tensor peak at the clock sampled during the run.
  frac = peak_frac(rec["tflops"], rec.get("sm_clock_mhz"), hopper_sm_count())
  if frac is not None:
    rec["fp8_peak_frac_at_clock"] = frac
  return rec


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy / jax scalars
    return _json_safe(x.item())
  return x


def write_results(name: str, records: Iterable[dict]) -> Path:
  """Writes ``benchmarks/results/<name>.json``; keeps records of other devices already there."""
  if not name or Path(name).name != name:
    raise ValueError(f"results name must be a plain file name (no folders), got {name!r}")
  records = [_json_safe(dict(r)) for r in records]
  path = RESULTS_DIR / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  old = []
  if path.exists():
    try:
      old = json.loads(path.read_text())
      if not isinstance(old, list):
        raise ValueError("not a JSON list")
    except (ValueError, OSError) as e:
      backup = path.with_suffix(f".json.bad-{run_id()}")
      print(f"warning: {path} unreadable ({e}); moved to {backup}", file=sys.stderr)
      os.replace(path, backup)
      old = []
  devices = {r.get("device") for r in records}
  merged = [r for r in old if isinstance(r, dict) and r.get("device") not in devices]
  merged += records
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(merged, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return path


# --------------------------------------------------------------------------- tables

def fmt(x, digits: int = 1) -> str:
  """Short cell text: '-' for missing, fixed digits for floats, scientific for tiny ones."""
  if x is None:
    return "-"
  if isinstance(x, float):
    if not math.isfinite(x):
      return "-"
    if x != 0 and abs(x) < 10 ** -(digits + 1):
      return f"{x:.1e}"
    return f"{x:.{digits}f}"
  return str(x)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *,
                title: str | None = None, file=None) -> None:
  """Prints ``rows`` (cells already formatted or formatted with ``fmt``) as aligned columns.

  Text columns are left-aligned, the others right-aligned.
  """
  file = file or sys.stdout
  cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
  def is_num(c):
    if not isinstance(c, str):
      return True
    try:
      float(c)
      return True
    except ValueError:
      return c == "-"
  numeric = [bool(rows) and all(is_num(row[i]) for row in rows) for i in range(len(headers))]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

  def line(vals):
    return "  ".join(v.rjust(w) if num else v.ljust(w)
                     for v, w, num in zip(vals, widths, numeric)).rstrip()

  if title:
    print(title, file=file)
  print(line(headers), file=file)
  print("  ".join("-" * w for w in widths), file=file)
  for r in cells:
    print(line(r), file=file)
  file.flush()


def print_header() -> None:
  """Device, jax and jax_deepgemm paths; warns when the kernels are not in use."""
  import jax_deepgemm
  dev = jax.devices()[0]
  kernels = jax_deepgemm.use_kernels()
  print(f"device: {device_name()} ({dev.platform})  jax {jax.__version__}  run {run_id()}")
  print(f"jax_deepgemm: {Path(jax_deepgemm.__file__).parent}  "
        f"extension_built={jax_deepgemm.extension_built()}  use_kernels={kernels}")
  if os.environ.get("XLA_FLAGS"):
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
  if dev.platform in ("gpu", "cuda") and not kernels:
    print("WARNING: jax_deepgemm is on its reference path: its timings are XLA dots of "
          "dequantized inputs, not the Hopper kernels.", file=sys.stderr)
  sys.stdout.flush()


def finish(out: str, no_write: bool, records: list, failures: int, what: str = "") -> int:
  """Writes the results (unless ``no_write``), reports failures; returns the exit code."""
  if not no_write and records:
    path = write_results(out, records)
    print(f"wrote {len(records)} records to {path}")
  if failures:
    print(f"{failures} step(s) failed{what}; see the messages above", file=sys.stderr)
  return 1 if failures else 0
