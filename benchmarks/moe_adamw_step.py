"""One ``jax_deepgemm.flax.MoE`` training step with ``optax.adamw``, as a training loop runs it:
jitted with the parameters and optimizer state donated (H 7168, W 2048, top-8, 8192 tokens,
f32 parameters computing in bf16, FP8 experts). Wall clock of back-to-back steps, median of
4 bursts of 5 after 3 warmups; an experiment, not a bar
(``results/moe_adamw_step_f32_params_H100_s47.log``).
Unlike ``bench_moe.py`` (a bare ``value_and_grad``, whose f32 gradients are written out), here
the expert weights' bf16 gradients feed the optimizer's update directly, as XLA fuses them.

  python benchmarks/moe_adamw_step.py [experts]   (default 32; 64 needs
                                                   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 on 80 GB)
"""
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_deepgemm.flax import MoE


def main(experts=32, tokens=8192, hidden=7168, width=2048, top_k=8):
  m = MoE(hidden, width, experts, top_k, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
          param_dtype=jnp.float32)
  gdef, params, rest = nnx.split(m, nnx.Param, ...)
  del m
  opt = optax.adamw(1e-4)
  ostate = opt.init(params)
  x = jax.random.normal(jax.random.key(1), (tokens, hidden), jnp.bfloat16)

  def step(params, ostate, x):
    def loss(p):
      y, aux = nnx.merge(gdef, p, rest)(x)
      return jnp.mean(y.astype(jnp.float32) ** 2) + aux
    l, g = jax.value_and_grad(loss)(params)
    upd, ostate = opt.update(g, ostate, params)
    return optax.apply_updates(params, upd), ostate, l

  step = jax.jit(step, donate_argnums=(0, 1))
  for _ in range(3):
    params, ostate, l = step(params, ostate, x)
  jax.block_until_ready(l)
  ts = []
  for _ in range(4):
    t0 = time.perf_counter()
    for _ in range(5):
      params, ostate, l = step(params, ostate, x)
    jax.block_until_ready(l)
    ts.append((time.perf_counter() - t0) / 5 * 1e3)
  print(f"E{experts} adamw step ({jax.devices()[0].device_kind}): median "
        f"{sorted(ts)[len(ts) // 2]:.2f} ms, bursts {[round(t, 2) for t in ts]}, "
        f"loss {float(l):.4f}")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
