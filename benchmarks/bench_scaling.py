"""Multi-GPU scaling benchmark: the MoE layer and the training step on 1 vs N devices.

Weak scaling: every device gets the same load (tokens per device fixed), so with N devices the
global batch is N times larger, and ideal scaling is N times the tokens/s of one device.

  op "moe_layer_fwd_bwd_scaling": one jitted ``jax.value_and_grad`` step (w.r.t. every
    parameter) of ``sum(y * cotangent) + aux`` for ``jax_deepgemm.flax.MoE`` (as in
    bench_moe.py: bf16 parameters and activations), on ``--tokens`` tokens per device.
    1 device: the plain layer. N devices: ``MoE(..., mesh=...)``, expert-parallel over a
    ``(data, expert)`` mesh (experts split over ``expert``, tokens over all devices,
    ``all_to_all`` dispatch; see jax_deepgemm/expert_parallel.py).
  op "train_step_scaling": one optimizer step (forward, backward, AdamW update) of
    ``python -m jax_deepgemm.train``'s model (``--preset``) with ``--batch-per-device``
    sequences per device, data- and expert-parallel on N devices as ``--mesh`` runs it.

Devices: ``--devices 1,2,4,8`` (default: 1, the powers of two in between, and all visible
devices), each run on the first N devices; the expert axis is as large as divides both N and
the expert count (``--expert-axis`` caps it), the data axis takes the rest.

Records: m = global tokens per step, n = hidden, k = expert width, groups = experts, plus
``devices``, ``mesh``, ``step_ms``, ``tokens_per_s``, ``tokens_per_s_per_device`` and
``scaling_efficiency`` = (tokens/s per device on N) / (tokens/s on 1) (1.0 = perfect).
TFLOPS (layer) = (14·T·top_k·hidden·width + 4·T·hidden·experts) / t over all devices
(``bench_moe.moe_flops``: the step differentiates the parameters, not x). Timing:
``_timing.bench`` via bench_grouped.measure (see bench_grouped.py); the
parameters (and optimizer state) are shared by all rotated input sets.

The expert-parallel layer exchanges drop-free buffers: ``N_expert * t * min(top_k, experts per
device)`` rows per device (see expert_parallel.py), so large shapes may run out of memory:
recorded as "OOM".

  python benchmarks/bench_scaling.py                     # writes results/scaling.json
  python benchmarks/bench_scaling.py --quick --no-write  # CPU smoke run (4 CPU devices)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import _timing as T  # first: it makes a source checkout importable
import bench_grouped as BG  # shared helpers: measure, Runner, records
import bench_moe as BM
from jax_deepgemm import expert_parallel, train
from jax_deepgemm.flax import MoE

OP_LAYER = "moe_layer_fwd_bwd_scaling"
OP_TRAIN = "train_step_scaling"
BF16 = jnp.bfloat16
IMPLS = {"jax_deepgemm": "fp8", "bf16": "bf16"}


def device_counts(text: str | None, available: int) -> list[int]:
  if text:
    counts = BM.int_list(text)
    if max(counts) > available:
      raise argparse.ArgumentTypeError(f"--devices {text}: only {available} device(s) visible")
    return sorted(set(counts))
  counts = {1, available}
  counts.update(2 ** i for i in range(1, int(math.log2(available)) + 1))
  return sorted(c for c in counts if c <= available)


def make_mesh(n: int, experts: int, cap: int | None):
  """``(data, expert)`` mesh over the first ``n`` devices, or None for one device."""
  if n == 1:
    return None
  ep = math.gcd(n, experts)
  if cap:
    ep = max(d for d in range(1, ep + 1) if ep % d == 0 and d <= cap)
  return expert_parallel.make_mesh(data=n // ep, expert=ep, devices=jax.devices()[:n])


def mesh_name(mesh) -> str:
  return "1 device" if mesh is None else ",".join(f"{k}={v}" for k, v in mesh.shape.items())


def rows(mesh):
  """Sharding of a batch (leading axis) over all devices of ``mesh``."""
  return None if mesh is None else NamedSharding(mesh, P(mesh.axis_names))


# ------------------------------------------------------------------ the MoE layer

def layer_case(args, impl, mesh):
  """``(step, make_inputs, global_tokens)`` for the MoE layer's forward + backward."""
  n = 1 if mesh is None else mesh.size
  tokens = args.tokens * n
  moe = MoE(args.hidden, args.expert_width, args.experts, args.top_k, rngs=nnx.Rngs(0),
            experts_impl=impl, dtype=BF16, param_dtype=BF16, mesh=mesh)
  if mesh is not None:
    train.place_state(moe, mesh)  # router (and shared experts) replicated on the mesh
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  step = BM.make_step(graphdef, rest)
  data = jax.jit(lambda key: tuple(jax.random.normal(k, (tokens, args.hidden), BF16)
                                   for k in jax.random.split(key)),
                 out_shardings=None if mesh is None else (rows(mesh), rows(mesh)))

  def make(key):
    return (params, *data(key))
  return step, make, tokens


# ------------------------------------------------------------------ the training step

def train_case(args, cfg, impl, mesh):
  """``(step, make_inputs, global_tokens)`` for one optimizer step of the train.py model."""
  n = 1 if mesh is None else mesh.size
  batch = args.batch_per_device * n
  cfg = dataclasses.replace(cfg, batch=batch)
  model = train.make_model(cfg, impl, mesh=mesh)
  optimizer = train.make_optimizer(model, cfg)
  if mesh is not None:
    train.place_state(optimizer, mesh)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    loss = train.train_step(model, optimizer, tokens)
    return loss, nnx.state((model, optimizer))  # the updated state: nothing is dead code

  data = jax.jit(lambda key: jax.random.randint(key, (batch, cfg.seq + 1), 0, cfg.vocab,
                                                jnp.int32), out_shardings=rows(mesh))

  def make(key):
    return state, data(key)
  return step, make, batch * cfg.seq


# ------------------------------------------------------------------ driver

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  BG.add_common_args(p, "scaling")
  p.add_argument("--devices", help="comma-separated device counts (default 1, 2, 4, ... all)")
  p.add_argument("--expert-axis", type=int, help="largest expert-axis size to use")
  p.add_argument("--impl", choices=sorted(IMPLS), default="jax_deepgemm",
                 help="expert GEMMs: jax_deepgemm (FP8) or bf16 (ragged_dot)")
  p.add_argument("--skip-layer", action="store_true", help="time the training step only")
  p.add_argument("--skip-train", action="store_true", help="time the MoE layer only")
  p.add_argument("--tokens", type=int, help="layer: tokens per device (default 4096)")
  p.add_argument("--experts", type=int, help="layer: routed experts (default 64)")
  p.add_argument("--hidden", type=int, help="layer: model width (default 7168)")
  p.add_argument("--expert-width", type=int, help="layer: expert width (default 2048)")
  p.add_argument("--top-k", type=int, help="layer: experts per token (default 8)")
  p.add_argument("--preset", choices=sorted(train.PRESETS), help="training step: model preset "
                 "(default gpu; --quick: cpu)")
  p.add_argument("--batch-per-device", type=int, help="training step: sequences per device "
                 "(default 4; --quick: 2)")
  p.add_argument("--cpu-devices", type=int, help="CPU only: number of CPU devices "
                 "(default with --quick: 4)")
  args = p.parse_args(argv)

  defaults = (dict(tokens=64, experts=8, hidden=256, expert_width=128, top_k=2, preset="cpu",
                   batch_per_device=2, cpu_devices=4)
              if args.quick else
              dict(tokens=4096, experts=64, hidden=7168, expert_width=2048, top_k=8,
                   preset="gpu", batch_per_device=4))
  for key, val in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, val)
  if not 1 <= args.top_k <= args.experts:
    p.error(f"--top-k must be in [1, --experts], got {args.top_k}")
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
  try:
    counts = device_counts(args.devices, jax.device_count())
  except argparse.ArgumentTypeError as e:
    p.error(str(e))

  timing = BG.timing_config(args)
  T.print_header()
  impl = IMPLS[args.impl]
  h, w, e, k = args.hidden, args.expert_width, args.experts, args.top_k
  cfg = dataclasses.replace(train.PRESETS[args.preset], dtype="bfloat16")
  print(f"devices: {counts}; layer: {args.tokens} tokens/device, hidden {h}, expert width {w}, "
        f"{e} experts, top-{k}; training step: preset {args.preset}, "
        f"{args.batch_per_device} x {cfg.seq} tokens/device", flush=True)

  runner = BG.Runner()
  records, rows_out = [], []
  cases = []
  if not args.skip_layer:
    cases.append((OP_LAYER, e, lambda mesh: layer_case(args, impl, mesh),
                  lambda t: BM.moe_flops(t, h, w, e, k),
                  dict(n=h, k=w, groups=e, top_k=k)))
  if not args.skip_train:
    cases.append((OP_TRAIN, cfg.experts, lambda mesh: train_case(args, cfg, impl, mesh),
                  None, dict(n=cfg.hidden, k=cfg.expert_width, groups=cfg.experts,
                             top_k=cfg.top_k, layers=cfg.layers, seq=cfg.seq)))

  for op, experts, build, flops_of, shape in cases:
    base = None  # tokens/s on one device
    for n in counts:
      mesh = make_mesh(n, experts, args.expert_axis)
      label = f"{op} {mesh_name(mesh)}"
      print(f"[{label}]", flush=True)
      built, err = runner.attempt(f"{label}] [build", lambda: build(mesh))
      t = via = None
      tokens = None
      if built is not None:
        step, make, tokens = built
        t, via, err = runner.time_impl(label, step, make, timing, args.budget)
      tok_s = tokens / (t.time_us * 1e-6) if t is not None else None
      if n == 1:
        base = tok_s
      eff = tok_s / n / base if tok_s is not None and base else None
      flops = flops_of(tokens) if flops_of and tokens else 0.0
      records.append(BG.impl_record(
          op=op, impl=args.impl, m=tokens, timing=t, error=err, flops=flops, nbytes=None,
          config=BG.ours_config(via) if args.impl == "jax_deepgemm" else via, devices=n,
          mesh=mesh_name(mesh), step_ms=t and t.time_us / 1e3, tokens_per_s=tok_s,
          tokens_per_s_per_device=tok_s and tok_s / n, scaling_efficiency=eff, **shape))
      if flops_of is None:
        records[-1]["tflops"] = None
      rows_out.append([op, mesh_name(mesh), tokens or "-", BG.cell(t, t and t.time_us / 1e3, err),
                       BG.cell(t, tok_s, err), BG.cell(t, tok_s and tok_s / n, err),
                       T.fmt(eff, 2) if eff is not None else "-"])
      show = lambda x: x if isinstance(x, str) else T.fmt(x)  # noqa: E731
      print(f"[{label}] {show(rows_out[-1][3])} ms, {show(rows_out[-1][4])} tok/s, "
            f"efficiency {rows_out[-1][6]}", flush=True)
      if not args.no_write:  # after every measurement: a crash later keeps what was measured
        T.write_results(args.out, records)

  print()
  T.print_table(rows_out, ["op", "mesh", "tokens", "step ms", "tok/s", "tok/s/device",
                           "efficiency"],
                title=f"Weak scaling on {T.device_name()} (efficiency: tok/s per device vs 1 "
                      "device)")
  return T.finish(args.out, args.no_write, records, runner.failures, " (not counting OOMs)")


if __name__ == "__main__":
  sys.exit(main())
