"""MoE layer benchmark: one ``jax_deepgemm.flax.MoE`` forward + backward, FP8 vs bf16 experts.

For every token count, in one process, the time of one jitted step
``jax.value_and_grad(params -> sum(y * cotangent) + aux)(params)`` of
``MoE(hidden, expert_width, num_experts, top_k, experts_impl=..., dtype=bf16, param_dtype=bf16)``
(router, top-k, sort/dispatch, the gate|up and down grouped GEMMs, SwiGLU, combine, aux loss and
all their gradients w.r.t. every parameter), for
  jax_deepgemm  ``experts_impl="fp8"``: jax_deepgemm.fp8_grouped_linear for the expert GEMMs
  bf16          ``experts_impl="bf16"``: jax.lax.ragged_dot (bf16 operands, f32 result) -- which
                XLA's GPU compiler expands into dense masked dots over all experts (the f32
                result keeps it off cuDNN's ragged-dot fusion), so large shapes may run out of
                memory: recorded as "OOM", as is any implementation that does.
Both share the same parameters (one init, ``nnx.Rngs(0)``) and the same inputs (x [T, hidden]
bf16 normal, cotangent [T, hidden] bf16 normal).

Defaults (DeepSeek-V3-like): hidden 7168, expert width 2048, 64 experts (``--experts``), top-8,
tokens 8192 and 16384 (``--tokens``). Parameters are bf16 (``param_dtype``): 64 x 3 x 7168 x 2048
x 2 B = 5.6 GB, plus as much again for the gradients; ``--param-dtype float32`` (Flax's default,
f32 master weights computing in bf16) twice that.

Records: op "moe_layer_fwd_bwd", m = tokens, n = hidden, k = expert width, groups = experts;
``step_ms``, ``tokens_per_s``, ``ratio_vs_bf16`` = t_bf16 / t_fp8 (> 1: FP8 is faster).
TFLOPS = (14·T·top_k·hidden·width + 4·T·hidden·experts) / t (``moe_flops``), useful rows only:
the step differentiates the parameters, not x, so it runs the work of seven expert GEMMs of
2·T·top_k·hidden·width each (gate, up and down forward; down's dgrad; the three weight gradients;
gate and up run as one fused GEMM of twice the width, forward and wgrad; their dgrad, a gradient
of x, is dead code that XLA drops) and the router's forward and weight gradient
(2·T·hidden·experts each). ``--grad-x`` differentiates x too, as a layer inside a network does:
nine expert GEMMs' work (the fused gate|up dgrad, K = 2·width, counts two) and three router GEMMs
(``grad_x`` in the records). ``--micro-batches N``: a step of N micro-batches of T tokens
(gradient accumulation: a scan summing the loss and the parameter gradients; tokens_per_s counts
all N·T tokens, TFLOPS N micro-batches' work), and the FP8 step once more with the experts'
weights cast once per step (``MoE.quantize_weights``: impl ``jax_deepgemm_w_cast_once``, with
``ratio_vs_per_call_casts`` = t_jax_deepgemm / t_cast_once); ``micro_batches`` in the records.
``grad_diff``: DeepGEMM's 1 - 2Σxy / Σ(x² + y²) between the FP8 and bf16 expert-weight
gradients (the larger over w_gate_up, w_down). Timing: ``_timing.bench`` via
bench_grouped.measure (see bench_grouped.py); the parameters are shared by all rotated input sets
(only x and the cotangent rotate).
When the whole bf16 layer fails, its gate GEMM is timed alone (op "moe_bf16_gate_gemm":
``ragged_dot`` of the T·top_k routed rows with the gate half of w_gate_up, the real router's
group sizes) and the FP8 record gets ``ratio_vs_bf16_lower_bound`` = t_gemm / t_fp8: the bf16
layer's forward+backward runs that GEMM's work and at least six more of its size, so its ratio
can only be larger.

  python benchmarks/bench_moe.py                 # writes results/moe.json
  python benchmarks/bench_moe.py --experts 256 --tokens 4096
  python benchmarks/bench_moe.py --quick --no-write   # CPU smoke run
  python benchmarks/bench_moe.py --ragged-dot fusion   # bf16 baseline through XLA's ragged-dot fusion
  python benchmarks/bench_moe.py --kernel-times --skip-baseline   # + the FP8 step's kernels, us each
  python benchmarks/bench_moe.py --grad-x --hlo /tmp/moe.hlo   # x's gradient too; the step's HLO
  python benchmarks/bench_moe.py --micro-batches 4 --skip-baseline   # gradient accumulation,
                                 # and the FP8 weights cast once per step (quantize_weights)
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import _timing as T  # first: it makes a source checkout importable
import bench_grouped as BG  # shared helpers: measure, Runner, records
from jax_deepgemm.flax import MoE

OP = "moe_layer_fwd_bwd"
BF16 = jnp.bfloat16
F32 = jnp.float32
IMPLS = {"jax_deepgemm": "fp8", "bf16": "bf16"}  # record impl -> MoE experts_impl
EXPERT_WEIGHTS = ("w_gate_up", "w_down")
CAST_ONCE = "jax_deepgemm_w_cast_once"  # --micro-batches: the FP8 step, weights cast once
# --ragged-dot: XLA flags (present in jaxlib 0.10/0.11) for the bf16 baseline's ragged_dot.
RAGGED_DOT_FLAGS = {
    "dense": "",
    "fusion": "--xla_gpu_experimental_use_ragged_dot_fusion=true",
    "grouped_gemm": "--xla_gpu_experimental_use_ragged_dot_grouped_gemm=true",
}


def int_list(text: str):
  try:
    vals = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"bad integer list {text!r}") from e
  if not vals or min(vals) < 1:
    raise argparse.ArgumentTypeError(f"bad integer list {text!r}")
  return vals


def moe_flops(tokens, hidden, width, experts, top_k, grad_x=False):
  """Useful FLOPs of one ``make_step`` (forward + gradients w.r.t. the parameters): seven
  expert GEMMs' work over the ``tokens * top_k`` routed rows (gate, up, down; down's dgrad; three
  wgrads; gate and up run fused, as one GEMM of twice the width) and the f32 router's forward
  and weight gradient; with ``grad_x`` also the gate and up dgrads (one GEMM of K = 2·width) and
  the router's (nine expert GEMMs' work, three router GEMMs)."""
  gemms, router = (18.0, 6.0) if grad_x else (14.0, 4.0)
  return gemms * tokens * top_k * hidden * width + router * tokens * hidden * experts


PAD = {"auto": None, "on": True, "off": False}  # --pad-expert-rows -> MoE(pad_expert_rows=)


def make_moe(cfg, experts_impl, abstract=False):
  def build():
    return MoE(cfg.hidden, cfg.expert_width, cfg.experts, cfg.top_k, rngs=nnx.Rngs(0),
               experts_impl=experts_impl, dtype=BF16,
               param_dtype=jnp.dtype(getattr(cfg, "param_dtype", "bfloat16")),
               pad_expert_rows=PAD[getattr(cfg, "pad_expert_rows", "auto")])
  return nnx.eval_shape(build) if abstract else build()


def make_step(graphdef, rest, grad_x=False, micro_batches=1, cast_once=False):
  """``(params, x, ct) -> (loss, grads)``: the layer's forward and backward (``grad_x``: grads =
  (parameter gradients, x's gradient), as a layer inside a network needs).

  ``micro_batches`` > 1: x and ct are ``[micro_batches, T, hidden]`` and the step is gradient
  accumulation, a scan of forward+backward over them summing the loss and the parameter
  gradients (x's are stacked); ``cast_once``: with the experts' FP8 weights made once per step
  (``MoE.quantize_weights``) instead of in every micro-batch's call."""
  def step(params, x, ct):
    wf = nnx.merge(graphdef, params, rest).quantize_weights() if cast_once else None

    def loss(params, x, ct):
      y, aux = nnx.merge(graphdef, params, rest)(x, weights_fp8=wf)
      return jnp.sum(y.astype(F32) * ct.astype(F32)) + aux
    grad = jax.value_and_grad(loss, argnums=(0, 1) if grad_x else 0)
    if micro_batches == 1:
      return grad(params, x, ct)

    def body(acc, xc):
      l, g = grad(params, *xc)
      gp, gx = g if grad_x else (g, None)
      return jax.tree.map(jnp.add, acc, (l, gp)), gx
    zero = (jnp.zeros((), F32), jax.tree.map(jnp.zeros_like, params))
    (l, gp), gx = jax.lax.scan(body, zero, (x, ct))
    return l, ((gp, gx) if grad_x else gp)
  return step


def hlo_summary(step, make, path):
  """Writes the compiled step's optimized HLO to ``path``; returns {custom-call target: count}."""
  text = jax.jit(step).lower(*make(jax.random.PRNGKey(0))).compile().as_text()
  with open(path, "w") as f:
    f.write(text)
  counts = {}
  for target in re.findall(r'custom_call_target="([^"]+)"', text):
    counts[target] = counts.get(target, 0) + 1
  return counts


def make_inputs_fn(params, tokens, hidden, micro_batches=1):
  shape = (tokens, hidden) if micro_batches == 1 else (micro_batches, tokens, hidden)

  @jax.jit
  def data(key):
    kx, kc = jax.random.split(key)
    return jax.random.normal(kx, shape, BF16), jax.random.normal(kc, shape, BF16)

  def make(key):
    x, ct = data(key)
    return params, x, ct  # the same parameter buffers in every input set
  return make


def make_floor(graphdef, params, rest, tokens, hidden, top_k):
  """The bf16 layer's gate GEMM alone, for when the whole bf16 layer fails:
  ``ragged_dot(x_sorted [T*k, hidden], w_gate [E, hidden, width], group_sizes)`` (w_gate: the
  first half of w_gate_up's columns) with the group sizes of the real router on x. The layer's
  forward+backward runs this GEMM's work and at least six more of its size (gate and up as one
  GEMM of twice its width), so t_floor / t_fp8 is a lower bound of the layer ratio."""
  @jax.jit
  def data(key):
    x = jax.random.normal(key, (tokens, hidden), BF16)
    _, ids, _ = nnx.merge(graphdef, params, rest)._route(x)
    sizes = jnp.bincount(ids.reshape(-1), length=params["w_down"][...].shape[0]).astype(jnp.int32)
    x_sorted = jax.random.normal(jax.random.fold_in(key, 1), (tokens * top_k, hidden), BF16)
    return x_sorted, sizes

  def gemm(x_sorted, w, sizes):
    return jax.lax.ragged_dot(x_sorted, w, sizes, preferred_element_type=F32).astype(BF16)

  width = params["w_down"][...].shape[1]
  w_gate = params["w_gate_up"][...][..., :width]  # (a copy, made once)

  def make(key):
    x_sorted, sizes = data(key)
    return x_sorted, w_gate, sizes
  return gemm, make


def grad_diff(steps, make) -> float:
  """Largest DeepGEMM diff between the FP8 and bf16 gradients of the expert weights."""
  params, x, ct = make(jax.random.PRNGKey(1234))

  @jax.jit
  def d(a, b):
    a, b = a.astype(F32), b.astype(F32)
    return jnp.sum(jnp.square(a - b)) / jnp.maximum(jnp.sum(a * a + b * b), 1e-30)

  def grads(step):  # (the parameter gradients; with --grad-x the first of two)
    _, g = jax.jit(step)(params, x, ct)
    g = g[0] if isinstance(g, tuple) else g
    return {name: g[name][...] for name in EXPERT_WEIGHTS}

  g1 = grads(steps["jax_deepgemm"])
  gc.collect()
  g2 = grads(steps["bf16"])
  return max(float(d(g1[name], g2[name])) for name in EXPERT_WEIGHTS)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  BG.add_common_args(p, "moe")
  p.add_argument("--tokens", type=int_list, default=None,
                 help="comma-separated token counts (default 8192,16384)")
  p.add_argument("--experts", type=int, default=None, help="routed experts (default 64)")
  p.add_argument("--hidden", type=int, default=None, help="model width (default 7168)")
  p.add_argument("--expert-width", type=int, default=None, help="expert width (default 2048)")
  p.add_argument("--top-k", type=int, default=None, help="experts per token (default 8)")
  p.add_argument("--skip-baseline", action="store_true", help="time the FP8 layer only")
  p.add_argument("--no-diff", action="store_true", help="skip the FP8-vs-bf16 gradient check")
  p.add_argument("--kernel-times", action="store_true",
                 help="also the FP8 step's kernels from a profile: where a step's time goes")
  p.add_argument("--grad-x", action="store_true",
                 help="the step also differentiates x (a layer inside a network): + the fused "
                      "gate|up GEMM's dgrad (K = 2 * width) and the router's")
  p.add_argument("--hlo", default=None, metavar="PATH",
                 help="write the compiled FP8 step's optimized HLO (first token count) to PATH "
                      "and print its custom calls by target")
  p.add_argument("--micro-batches", type=int, default=1, metavar="N",
                 help="a step of N micro-batches of --tokens each (gradient accumulation), and "
                      "the FP8 step also with the experts' weights cast once per step "
                      "(MoE.quantize_weights: impl jax_deepgemm_w_cast_once)")
  p.add_argument("--pad-expert-rows", choices=tuple(PAD), default="auto",
                 help="MoE(pad_expert_rows=): each expert's rows padded to 128 (auto: the "
                      "layer's default)")
  p.add_argument("--param-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="MoE(param_dtype=): float32 is Flax's default (master weights; the FP8 "
                      "casts read them directly), twice the parameters' bytes")
  p.add_argument("--ragged-dot", choices=tuple(RAGGED_DOT_FLAGS), default="dense",
                 help="how XLA's GPU compiler lowers the bf16 layer's ragged_dot: 'dense' (its "
                      "default: dense masked dots, which run out of memory at large shapes), "
                      "'fusion' or 'grouped_gemm' (its experimental ragged-dot emitters)")
  args = p.parse_args(argv)
  if RAGGED_DOT_FLAGS[args.ragged_dot]:  # before the backend starts (first device use)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               RAGGED_DOT_FLAGS[args.ragged_dot]).strip()

  defaults = (dict(tokens=[64, 128], experts=8, hidden=256, expert_width=128, top_k=2)
              if args.quick else
              dict(tokens=[8192, 16384], experts=64, hidden=7168, expert_width=2048, top_k=8))
  for key, val in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, val)
  if not 1 <= args.top_k <= args.experts:
    p.error(f"--top-k must be in [1, --experts], got {args.top_k}")
  if args.micro_batches < 1:
    p.error(f"--micro-batches must be >= 1, got {args.micro_batches}")
  mb = args.micro_batches

  timing = BG.timing_config(args)
  T.print_header()
  h, w, e, k = args.hidden, args.expert_width, args.experts, args.top_k
  param_gb = (3 * e * h * w + h * e) * jnp.dtype(args.param_dtype).itemsize / 1e9
  print(f"MoE: hidden {h}, expert width {w}, {e} experts, top-{k}, {args.param_dtype} params "
        f"({param_gb:.1f} GB; as much again for the gradients)", flush=True)

  runner = BG.Runner()
  records, rows = [], []

  # One set of parameters for both implementations: the FP8 module's; the bf16 module is only
  # traced abstractly for its graph definition (no second copy of the weights).
  built, err = runner.attempt("init", lambda: nnx.split(make_moe(args, "fp8"), nnx.Param, ...))
  if built is None:
    print(f"could not build the MoE layer ({err})", file=sys.stderr)
    return 1
  graphdef_fp8, params, rest = built
  steps = {"jax_deepgemm": make_step(graphdef_fp8, rest, args.grad_x, mb)}
  if mb > 1:
    steps[CAST_ONCE] = make_step(graphdef_fp8, rest, args.grad_x, mb, cast_once=True)
  if not args.skip_baseline:
    graphdef_bf16, _, rest_bf16 = nnx.split(make_moe(args, "bf16", abstract=True), nnx.Param, ...)
    steps["bf16"] = make_step(graphdef_bf16, rest_bf16, args.grad_x, mb)

  for tokens in args.tokens:
    name = f"T{tokens} H{h} W{w} E{e} top{k}" + (f" x{mb}" if mb > 1 else "")
    flops = mb * moe_flops(tokens, h, w, e, k, args.grad_x)
    print(f"[{OP} {name}]", flush=True)
    make = make_inputs_fn(params, tokens, h, mb)
    if args.hlo and tokens == args.tokens[0]:
      counts, _ = runner.attempt(f"{name}] [hlo", lambda: hlo_summary(
          steps["jax_deepgemm"], make, args.hlo))
      if counts is not None:
        print(f"[{name}] FP8 step custom calls ({args.hlo}): " +
              ", ".join(f"{t} x{c}" for t, c in sorted(counts.items())), flush=True)
    results = {impl: runner.time_impl(f"{name}] [{impl}", step, make, timing, args.budget)
               for impl, step in steps.items()}
    t_fp8, via_fp8, e_fp8 = results["jax_deepgemm"]
    t_bf16, via_bf16, e_bf16 = results.get("bf16", (None, None, None))

    diff = None
    if t_fp8 is not None and t_bf16 is not None and not args.no_diff:
      if BG.slow(t_fp8, args.budget) or BG.slow(t_bf16, args.budget):
        print(f"[{name}] grad_diff skipped (slow calls)", flush=True)
      else:
        diff, _ = runner.attempt(f"{name}] [grad_diff", lambda: grad_diff(steps, make))

    # The whole bf16 layer failed (XLA's default ragged_dot lowering expands into dense dots
    # over all experts and runs out of memory; its experimental emitters fail or OOM on the
    # backward): time its first expert GEMM alone for a lower bound of the ratio (of one
    # micro-batch's step: not with --micro-batches).
    t_floor = e_floor = None
    if t_fp8 is not None and t_bf16 is None and not args.skip_baseline and mb == 1:
      gemm, make_gemm = make_floor(graphdef_fp8, params, rest, tokens, h, k)
      t_floor, via_floor, e_floor = runner.time_impl(f"{name}] [bf16 gate GEMM", gemm,
                                                     make_gemm, timing, args.budget)
      records.append(BG.impl_record(
          op="moe_bf16_gate_gemm", impl="ragged_dot_bf16", m=tokens * k, n=w, k=h, groups=e,
          timing=t_floor, error=e_floor, flops=2.0 * tokens * k * h * w, nbytes=None,
          config=via_floor, xla_ragged_dot=args.ragged_dot))
      if t_floor is not None:
        print(f"[{name}] bf16 layer failed; its gate GEMM alone (ragged_dot "
              f"[{tokens * k}, {h}] x [{e}, {h}, {w}]): {t_floor.time_us / 1e3:.1f} ms "
              f"({T.tflops(2.0 * tokens * k * h * w, t_floor.time_us):.1f} TFLOPS, {via_floor}) "
              f"-> FP8 layer fwd+bwd >= {BG.ratio(t_floor, t_fp8):.2f}x the bf16 layer",
              flush=True)

    kt = {}
    if args.kernel_times and t_fp8 is not None:
      kt = BG.kernel_breakdown(runner, name, "FP8 step", steps["jax_deepgemm"], make,
                               n_sets=2, reps=3, top=30)

    r = BG.ratio(t_bf16, t_fp8)
    common = dict(op=OP, m=tokens, n=h, k=w, groups=e, flops=flops, top_k=k, tokens=tokens,
                  pad_expert_rows=args.pad_expert_rows, grad_x=args.grad_x,
                  param_dtype=args.param_dtype, dtype="bfloat16", xla_ragged_dot=args.ragged_dot,
                  micro_batches=mb)

    def perf(t):  # (tokens per second over all micro-batches)
      return (dict(step_ms=t.time_us / 1e3, tokens_per_s=mb * tokens / (t.time_us * 1e-6))
              if t else {})
    records.append(BG.impl_record(impl="jax_deepgemm", timing=t_fp8, error=e_fp8, nbytes=None,
                                  config=BG.ours_config(via_fp8), ratio_vs_bf16=r,
                                  ratio_vs_bf16_lower_bound=BG.ratio(t_floor, t_fp8),
                                  grad_diff=diff, **perf(t_fp8), **kt, **common))
    if mb > 1:
      t_once, via_once, e_once = results[CAST_ONCE]
      records.append(BG.impl_record(impl=CAST_ONCE, timing=t_once, error=e_once, nbytes=None,
                                    config=BG.ours_config(via_once),
                                    ratio_vs_bf16=BG.ratio(t_bf16, t_once),
                                    ratio_vs_per_call_casts=BG.ratio(t_fp8, t_once),
                                    **perf(t_once), **common))
      if t_once is not None:
        print(f"[{name}] fp8 with the weights cast once per step: {t_once.time_us / 1e3:.1f} ms "
              f"({BG.ratio(t_fp8, t_once) or float('nan'):.3f}x the step casting them in every "
              f"micro-batch)", flush=True)
    if not args.skip_baseline:
      records.append(BG.impl_record(impl="bf16", timing=t_bf16, error=e_bf16, nbytes=None,
                                    config=via_bf16, **perf(t_bf16), **common))

    def tok_s(t):
      return mb * tokens / (t.time_us * 1e-6) if t else None
    row = [name,
           BG.cell(t_fp8, t_fp8 and t_fp8.time_us / 1e3, e_fp8),
           BG.cell(t_fp8, tok_s(t_fp8), e_fp8),
           BG.cell(t_fp8, t_fp8 and T.tflops(flops, t_fp8.time_us), e_fp8),
           BG.ours_config(via_fp8) or "-",
           BG.cell(t_bf16, t_bf16 and t_bf16.time_us / 1e3, e_bf16),
           BG.cell(t_bf16, tok_s(t_bf16), e_bf16),
           BG.cell(t_bf16, t_bf16 and T.tflops(flops, t_bf16.time_us), e_bf16),
           via_bf16 or "-", T.fmt(r, 2) if r is not None else "-",
           f"{diff:.1e}" if diff is not None else "-"]
    rows.append(row)
    show = lambda x: x if isinstance(x, str) else T.fmt(x)  # noqa: E731
    print(f"[{name}] fp8 {show(row[1])} ms {show(row[2])} tok/s ({row[4]}) | bf16 "
          f"{show(row[5])} ms {show(row[6])} tok/s ({row[8]}) | x {row[9]} | grad_diff {row[10]}",
          flush=True)
    if not args.no_write:  # after every token count: a crash later on keeps what was measured
      T.write_results(args.out, records)

  print()
  T.print_table(rows, ["shape", "fp8 ms", "fp8 tok/s", "fp8 TFLOPS", "fp8 via", "bf16 ms",
                       "bf16 tok/s", "bf16 TFLOPS", "bf16 via", "x vs bf16", "grad_diff"],
                title=f"MoE layer forward+backward on {T.device_name()} "
                      "(x vs bf16: t_bf16 / t_fp8, > 1 = FP8 faster)")

  return T.finish(args.out, args.no_write, records, runner.failures, " (not counting OOMs)")


if __name__ == "__main__":
  sys.exit(main())
