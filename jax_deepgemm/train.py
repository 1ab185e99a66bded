"""``python -m jax_deepgemm.train``: train a small MoE language model with FP8 experts.

The model: token embedding, the preset's ``layers`` transformer blocks (RMSNorm, causal
attention, RMSNorm, ``jax_deepgemm.flax.MoE`` with SwiGLU experts), RMSNorm, unembedding. The
data: a synthetic language shipped as code, a fixed random Markov chain whose entropy is the
best achievable loss, so a run shows how close the model gets. Everything runs under ``nnx.jit``
with optax AdamW; ``--experts both`` (default) trains the FP8 and the bf16 (``ragged_dot``)
experts from the same init and compares their losses. Writes a loss-curve PNG at the end and,
with ``--ckpt-dir``, an orbax checkpoint of the last model trained (``--restore`` starts from
its weights; the optimizer state and the data stream start afresh). ``--micro-batches N`` takes
each step's batch in N micro-batches (gradient accumulation), the FP8 experts' weights cast once
per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from jax_deepgemm import _png, expert_parallel
from jax_deepgemm.flax import MoE


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 96
  hidden: int = 64
  heads: int = 4
  layers: int = 2
  experts: int = 8
  top_k: int = 2
  expert_width: int = 128
  seq: int = 64
  batch: int = 16
  steps: int = 150
  lr: float = 3e-3
  dtype: str = "float32"
  micro_batches: int = 1  # gradient accumulation: each step's batch in this many pieces


PRESETS = {
    "cpu": Config(),
    # A real GPU run: DeepSeek-like routing at a size one H100/H200 trains quickly.
    "gpu": Config(vocab=4096, hidden=2048, heads=16, layers=4, experts=64, top_k=8,
                  expert_width=1024, seq=1024, batch=16, steps=500, lr=1e-3, dtype="bfloat16"),
}


class MarkovLanguage:
  """Each token has 4 likely successors (a fixed random chain): entropy is known exactly."""

  def __init__(self, vocab, seed=0):
    rng = np.random.default_rng(seed)
    probs = np.full((vocab, vocab), 0.02 / vocab)
    for t in range(vocab):
      nxt = rng.choice(vocab, 4, replace=False)
      probs[t, nxt] += rng.dirichlet(np.ones(4)) * 0.98
    self.probs = probs / probs.sum(1, keepdims=True)
    self.cdf = np.cumsum(self.probs, 1)
    stationary = np.linalg.matrix_power(self.probs, 200)[0]
    self.entropy = float(-(stationary[:, None] * self.probs * np.log(self.probs)).sum())
    self.rng = np.random.default_rng(seed + 1)

  def batch(self, b, length):
    out = np.empty((b, length), np.int32)
    out[:, 0] = self.rng.integers(0, len(self.probs), b)
    for i in range(1, length):
      u = self.rng.random(b)[:, None]
      out[:, i] = np.minimum((u > self.cdf[out[:, i - 1]]).sum(1), len(self.probs) - 1)
    return out


class Block(nnx.Module):

  def __init__(self, cfg: Config, impl: str, *, rngs: nnx.Rngs, mesh=None):
    dtype = jnp.dtype(cfg.dtype)
    self.norm1 = nnx.RMSNorm(cfg.hidden, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.heads, in_features=cfg.hidden,
                                       decode=False, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.RMSNorm(cfg.hidden, rngs=rngs)
    self.moe = MoE(cfg.hidden, cfg.expert_width, cfg.experts, cfg.top_k, rngs=rngs,
                   experts_impl=impl, dtype=dtype, mesh=mesh)

  def __call__(self, x, mask, weights_fp8=None):
    x = x + self.attn(self.norm1(x), mask=mask)
    y, aux = self.moe(self.norm2(x), weights_fp8=weights_fp8)
    return x + y, aux


class MoELM(nnx.Module):

  def __init__(self, cfg: Config, impl: str, *, rngs: nnx.Rngs, mesh=None):
    self.embed = nnx.Embed(cfg.vocab, cfg.hidden, rngs=rngs)
    blocks = [Block(cfg, impl, rngs=rngs, mesh=mesh) for _ in range(cfg.layers)]
    self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
    self.norm = nnx.RMSNorm(cfg.hidden, rngs=rngs)

  def quantize_weights(self):
    """Every block's FP8 expert weights (``MoE.quantize_weights``) for ``__call__``; None
    with bf16 experts."""
    if self.blocks[0].moe.experts_impl != "fp8":
      return None
    return [block.moe.quantize_weights() for block in self.blocks]

  def __call__(self, tokens, weights_fp8=None):
    x = self.embed(tokens)
    mask = nnx.make_causal_mask(tokens)
    aux = jnp.zeros((), jnp.float32)
    for i, block in enumerate(self.blocks):
      x, a = block(x, mask, None if weights_fp8 is None else weights_fp8[i])
      aux = aux + a
    return self.embed.attend(self.norm(x)).astype(jnp.float32), aux


def make_model(cfg: Config, impl: str, seed: int = 0, mesh=None):
  """The model; with ``mesh``, its MoE layers are expert-parallel and its state is placed."""
  model = MoELM(cfg, impl, rngs=nnx.Rngs(seed), mesh=mesh)
  if mesh is not None:
    place_state(model, mesh)
  return model


def place_state(obj, mesh):
  """Puts every array of ``obj``'s state on ``mesh``: replicated, unless already on it.

  (The MoE layers' expert weights are already split over the expert axis.) Every process
  holds the same values, built from the same seed, so each can place its own shards.
  """
  def place(x):
    if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))
  nnx.update(obj, jax.tree.map(place, nnx.state(obj)))


def parse_mesh(spec: str, cfg: Config):
  """``"auto"`` or ``"data=D,expert=E"`` (either may be left out) → a mesh of all devices."""
  n = jax.device_count()
  if spec == "auto":
    return expert_parallel.make_mesh(expert=math.gcd(n, cfg.experts))
  sizes = {}
  for part in spec.split(","):
    name, _, val = part.partition("=")
    if name.strip() not in ("data", "expert") or not val.strip().isdigit():
      raise ValueError(f"--mesh: expected 'auto' or 'data=D,expert=E', got {spec!r}")
    sizes[name.strip()] = int(val)
  return expert_parallel.make_mesh(**sizes)


def micro_batch_grads(model, tokens, micro_batches=1):
  """``(cross-entropy, parameter gradients)`` of the loss on ``tokens [B, L + 1]``.

  ``micro_batches`` > 1: gradient accumulation, both averaged over that many micro-batches of
  ``B / micro_batches`` rows (a ``scan``: one micro-batch's activations live at a time). The
  parameters do not change within the step, so FP8 experts cast their weights once, before
  the scan (``MoELM.quantize_weights``), instead of in every micro-batch's call.
  """
  b = tokens.shape[0]
  if micro_batches < 1 or b % micro_batches:
    raise ValueError(f"micro_batch_grads: the batch ({b}) must split into {micro_batches} "
                     "equal micro-batches")

  def loss_fn(model, tokens, weights_fp8=None):
    logits, aux = model(tokens[:, :-1], weights_fp8)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + aux, ce
  if micro_batches == 1:
    (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens)
    return ce, grads
  # A scan body takes arrays: the parameters as a state, merged back into the model inside.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad = jax.value_and_grad(lambda p, *a: loss_fn(nnx.merge(graphdef, p, rest), *a),
                            has_aux=True)
  weights_fp8 = model.quantize_weights()
  # Micro-batch j holds rows j, j + n, j + 2n, ...: rows split over devices stay there.
  pieces = jnp.swapaxes(tokens.reshape(b // micro_batches, micro_batches, -1), 0, 1)

  def body(acc, piece):
    (_, ce), g = grad(params, piece, weights_fp8)
    return jax.tree.map(jnp.add, acc, (ce, g)), None
  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(body, zero, pieces)
  return jax.tree.map(lambda t: t / micro_batches, total)


@functools.partial(nnx.jit, static_argnames="micro_batches")
def train_step(model, optimizer, tokens, micro_batches=1):
  ce, grads = micro_batch_grads(model, tokens, micro_batches)
  optimizer.update(model, grads)
  return ce


def make_optimizer(model, cfg: Config):
  warmup = min(10, cfg.steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                                cfg.lr / 10)
  tx = optax.adamw(schedule, weight_decay=0.01)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _progress(i, total, loss, t0, tty):
  if not tty:
    return
  done = int(30 * i / total)
  sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{total} loss {loss:.4f} "
                   f"{(time.time() - t0):.0f}s")
  sys.stderr.flush()


def train(cfg: Config, impl: str, data_seed=0, seed=0, log_every=25, model=None, mesh=None):
  """Trains one model; returns (model, [(step, loss)], seconds of the steps after the first).

  The first step compiles, so it is left out of the time (None with a single step). With
  ``mesh`` (see ``parse_mesh``) the run is data- and expert-parallel over it; every process
  draws the same global batches and feeds its devices their rows.
  """
  if (why := batch_split_error(cfg, mesh)) is not None:
    raise ValueError(f"train: {why}")
  lang = MarkovLanguage(cfg.vocab, data_seed)
  model = model if model is not None else make_model(cfg, impl, seed, mesh)
  optimizer = make_optimizer(model, cfg)
  if mesh is not None:
    place_state(optimizer, mesh)
    rows = NamedSharding(mesh, P(mesh.axis_names))
  losses, t0, tty = [], time.time(), sys.stderr.isatty() and jax.process_index() == 0

  def next_batch():
    tokens = lang.batch(cfg.batch, cfg.seq + 1)
    return jax.device_put(tokens, rows) if mesh is not None else jnp.asarray(tokens)

  tokens = next_batch()
  for step in range(1, cfg.steps + 1):
    # Dispatched: the device runs the step while the host draws the next batch.
    loss = train_step(model, optimizer, tokens, micro_batches=cfg.micro_batches)
    if step < cfg.steps:
      tokens = next_batch()
    loss = float(loss)
    if step == 1:  # it compiled: the time is taken from here (tokens/s counted compiling)
      t1 = time.time()
    losses.append((step, loss))
    _progress(step, cfg.steps, loss, t0, tty)
    if jax.process_index() == 0 and (step % log_every == 0 or step == cfg.steps):
      if tty:
        sys.stderr.write("\n")
      print(f"[{impl}] step {step:5d}  loss {loss:.4f}  (floor {lang.entropy:.4f})  "
            f"{time.time() - t0:.1f}s", flush=True)
  return model, losses, (time.time() - t1 if cfg.steps > 1 else None)


def batch_split_error(cfg: Config, mesh=None):
  """Why ``cfg.batch`` cannot be split into its micro-batches and each of those over the
  mesh's devices, or None."""
  if cfg.micro_batches < 1 or cfg.batch % cfg.micro_batches:
    return (f"the batch ({cfg.batch}) must split into micro_batches ({cfg.micro_batches}) "
            "equal micro-batches")
  rows = cfg.batch // cfg.micro_batches
  if mesh is not None and rows % mesh.size:
    what = "the batch" if cfg.micro_batches == 1 else "each micro-batch"
    return f"{what} ({rows}) must split evenly over the mesh's {mesh.size} devices"
  return None


def _is_checkpoint(entries):
  """Whether a directory's ``entries`` are an orbax checkpoint's (its metadata file)."""
  return "_CHECKPOINT_METADATA" in entries


def check_ckpt_dir(path):
  """Why `path` must not take a checkpoint, or None: saving replaces the directory (orbax's
  force=True), so only a missing or empty one, or an earlier checkpoint, is overwritten."""
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    return f"{path} exists and is not a directory"
  entries = os.listdir(path)
  if entries and not _is_checkpoint(entries):
    return (f"{path} holds files that are not an orbax checkpoint (saving would delete them): "
            "name a new or empty directory")
  return None


def save_checkpoint(model, path):
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if (why := check_ckpt_dir(path)) is not None:
    raise ValueError(why)
  if jax.process_count() > 1:  # every process has looked before any of them writes
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jax_deepgemm.train.save_checkpoint")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, nnx.state(model), force=True)


def restore_checkpoint(model, path):
  import orbax.checkpoint as ocp
  graphdef, state = nnx.split(model)
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.abspath(path), state)
  return nnx.merge(graphdef, state)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--experts", choices=("fp8", "bf16", "both"), default="both")
  p.add_argument("--steps", type=int, help="override the preset's step count")
  p.add_argument("--micro-batches", type=int, default=1, metavar="N",
                 help="take each step's batch in N micro-batches (gradient accumulation; FP8 "
                      "expert weights cast once per step)")
  p.add_argument("--plot", default="loss_curve.png", help="where to write the loss curve")
  p.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
  p.add_argument("--ckpt-dir", help="save the (last trained) model here with orbax (a new or "
                 "empty directory, or an earlier checkpoint, which is replaced)")
  p.add_argument("--restore", help="start from this checkpoint (same preset)")
  par = p.add_argument_group("multi-device")
  par.add_argument("--mesh", help="data- and expert-parallel over all devices: 'data=D,expert=E' "
                   "(D*E = device count; either may be left out) or 'auto'")
  par.add_argument("--parallel", action="store_true", help="same as --mesh auto")
  par.add_argument("--distributed", action="store_true",
                   help="multi-process run: call jax.distributed.initialize() first")
  par.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
  par.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="number of processes (env JAX_NUM_PROCESSES)")
  par.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="this process' index (env JAX_PROCESS_ID)")
  par.add_argument("--cpu-devices", type=int,
                   help="CPU only: devices per process (for trying the parallel paths on CPU)")
  args = p.parse_args(argv)
  for flag, value in (("--steps", args.steps), ("--log-every", args.log_every),
                      ("--cpu-devices", args.cpu_devices), ("--micro-batches", args.micro_batches)):
    if value is not None and value < 1:
      p.error(f"{flag} must be at least 1, got {value}")
  # Checked before training, not after it (a bad path would lose the run).
  if not args.plot or args.plot.endswith((os.sep, "/")) or os.path.isdir(args.plot):
    # (opening it for the PNG failed after training; abspath drops a trailing "/")
    p.error(f"--plot: {args.plot!r} names a directory, or nothing; name the PNG file to write")
  plot_dir = os.path.dirname(os.path.abspath(args.plot))
  if not os.path.isdir(plot_dir):
    p.error(f"--plot: directory {plot_dir} does not exist")
  if args.ckpt_dir and (why := check_ckpt_dir(os.path.abspath(args.ckpt_dir))) is not None:
    p.error(f"--ckpt-dir: {why}")
  if args.restore is not None and not (  # (else orbax's traceback, after the model is built)
      os.path.isdir(args.restore) and _is_checkpoint(os.listdir(args.restore))):
    p.error(f"--restore: {args.restore!r} is not a checkpoint (an earlier run's --ckpt-dir)")
  cfg = dataclasses.replace(PRESETS[args.preset], micro_batches=args.micro_batches)
  if args.steps is not None:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  if (why := batch_split_error(cfg)) is not None:  # (before the devices start)
    p.error(f"--micro-batches: {why}")
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.distributed:
    # Unset values are left to JAX's cluster auto-detection (SLURM, Open MPI, ...).
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  try:
    mesh = parse_mesh("auto" if args.parallel else args.mesh, cfg) \
        if (args.parallel or args.mesh is not None) else None
  except ValueError as e:
    p.error(str(e))
  if (why := batch_split_error(cfg, mesh)) is not None:  # (train's ValueError: a traceback)
    p.error(f"--mesh: {why}")
  if mesh is not None and cfg.experts % mesh.shape["expert"]:  # (MoE's ValueError, likewise)
    p.error(f"--mesh: the {cfg.experts} experts must split evenly over the expert axis "
            f"({mesh.shape['expert']})")
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  say(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} "
      f"({jax.process_count()} process(es)); preset {args.preset}: {cfg}")
  if mesh is not None:
    say(f"mesh: {dict(mesh.shape)} (tokens over all axes, experts over 'expert')")
  impls = ("fp8", "bf16") if args.experts == "both" else (args.experts,)
  curves, model = {}, None
  for impl in impls:
    model = make_model(cfg, impl, mesh=mesh)
    if args.restore:
      model = restore_checkpoint(model, args.restore)
    model, losses, secs = train(cfg, impl, log_every=args.log_every, model=model, mesh=mesh)
    rate = (f"; {(cfg.steps - 1) * cfg.batch * cfg.seq / secs:,.0f} tokens/s after the first "
            "(compiling) step" if secs is not None else "")
    say(f"[{impl}] final loss {losses[-1][1]:.4f}{rate}")
    curves[f"{impl} experts"] = losses
  if len(impls) == 2:
    tail = {k: np.mean([l for _, l in v[-10:]]) for k, v in curves.items()}
    fp8, bf16 = tail["fp8 experts"], tail["bf16 experts"]
    say(f"last-10-step mean loss: fp8 {fp8:.4f} vs bf16 {bf16:.4f} "
        f"({100 * (fp8 - bf16) / bf16:+.2f}%)")
  if args.ckpt_dir:
    save_checkpoint(model, args.ckpt_dir)  # every process writes its shards
    say(f"saved checkpoint to {args.ckpt_dir} ({impls[-1]} experts)")
  if lead:
    colors = _png.plot_curves(args.plot, curves)
    print(f"wrote {args.plot} (" + ", ".join(f"{k}: rgb{c}" for k, c in colors.items()) + ")")


def _env_int(name):
  v = os.environ.get(name)
  return int(v) if v else None


if __name__ == "__main__":
  main()
