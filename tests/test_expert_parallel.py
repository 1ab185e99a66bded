"""Expert-parallel MoE (MoE(..., mesh=...)): the single-device layer's values and gradients.

Each case runs in a child process with 8 CPU devices. The expert-parallel layer routes the
same tokens to the same experts and adds the same products, so with f32 compute it matches
the single-device layer to float rounding: outputs, aux loss, input and router gradients,
and, for the bf16 (``ragged_dot``) experts, every weight gradient. The FP8 weight gradients
quantize the activations in 128-token groups along the token axis (DeepSeek-V3's wgrad
recipe), and which tokens share a group depends on the layout, which differs between the two
layers: those agree to within an FP8 rounding, and are as close to the exact gradients as the
single-device layer's are.
"""
import pytest

import multidevice

LAYER_CONFIGS = ["data2_expert4_shared", "expert8_sigmoid_k3", "explicit_axes_mesh",
                 "mixed_axes_mesh", "expert4_padded_rows"]


@pytest.mark.parametrize("config", LAYER_CONFIGS)
@pytest.mark.parametrize("impl", ["bf16", "fp8"])
def test_layer_matches_single_device(impl, config):
  multidevice.run(__file__, "case_layer", impl, config)


def test_training_steps_match_single_device():
  multidevice.run(__file__, "case_training")


def test_micro_batched_training_matches_single_device():
  multidevice.run(__file__, "case_micro_batches")


def test_errors():
  multidevice.run(__file__, "case_errors")


def test_expert_weights_placed_when_traced():
  multidevice.run(__file__, "case_placement")


def test_empty_batch_eager_and_jitted_grads():
  multidevice.run(__file__, "case_empty_batch")


def test_eager_grads_match_single_device():
  multidevice.run(__file__, "case_eager_grads")


def test_flax_sharding_metadata_names_the_expert_split():
  multidevice.run(__file__, "case_partition_metadata")


# ----------------------------------------------------------------------------- child side
def _moe(mesh, impl, h, w, e, k, **kw):
  import jax.numpy as jnp
  from flax import nnx
  from jax_deepgemm.flax import MoE
  # f32 compute for both implementations: the comparison is then not blurred by bf16
  # roundings of intermediates, which can land on either side of a rounding boundary.
  return MoE(h, w, e, k, rngs=nnx.Rngs(0), experts_impl=impl, dtype=jnp.float32,
             aux_loss_coef=0.5, mesh=mesh, **kw)


def _value_and_grads(model, x, r):
  import jax.numpy as jnp
  from flax import nnx
  def f(m, x):
    y, aux = m(x)
    return jnp.sum(y * r) + aux, (y, aux)
  (_, (y, aux)), (gm, gx) = nnx.jit(nnx.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      model, x)
  return y, aux, gx, nnx.to_pure_dict(gm)


def case_layer(impl, config):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  import oracle
  from jax_deepgemm import expert_parallel
  from test_flax_moe import FP8_LAYER_TOL, reference_value_and_grads

  if config == "data2_expert4_shared":
    mesh = expert_parallel.make_mesh(data=2, expert=4)
    h, w, e, k, kw, lead = 64, 32, 8, 2, dict(num_shared_experts=1), (8, 16)
  elif config == "expert8_sigmoid_k3":
    # 2 experts per device < top-3: a token can send 2 rows to one device.
    mesh = expert_parallel.make_mesh(expert=8)
    h, w, e, k, kw, lead = 48, 40, 16, 3, dict(score="sigmoid"), (16, 8)
  elif config == "expert4_padded_rows":
    # Each expert's rows padded to 128 in both layers (pad_expert_rows=True).
    mesh = expert_parallel.make_mesh(data=2, expert=4)
    h, w, e, k, kw, lead = 64, 32, 8, 2, dict(pad_expert_rows=True), (8, 16)
  elif config == "explicit_axes_mesh":
    # jax.make_mesh's default: explicit axes (inputs are resharded for the shard_map).
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    h, w, e, k, kw, lead = 64, 32, 8, 2, {}, (8, 16)
  else:
    # Explicit data, Auto experts (reshard may name only the Explicit one).
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(
        jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto))
    h, w, e, k, kw, lead = 64, 32, 8, 2, {}, (8, 16)
  assert mesh.size == 8

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(lead + (h,)), jnp.float32)
  r = jnp.asarray(rng.standard_normal(lead + (h,)), jnp.float32)
  single = _moe(None, impl, h, w, e, k, **kw)
  par = _moe(mesh, impl, h, w, e, k, **kw)
  # A sharper router than the init's, so that routing is far from uniform and from ties.
  router = jnp.asarray(rng.standard_normal((h, e)) * 0.3, jnp.float32)
  single.router[...] = router
  par.router[...] = router
  by_expert = NamedSharding(mesh, P("expert"))
  for name in ("w_gate_up", "w_down"):  # same init, and split over the expert axis
    np.testing.assert_array_equal(getattr(par, name)[...], getattr(single, name)[...])
    assert getattr(par, name)[...].sharding.is_equivalent_to(by_expert, 3), name

  y1, aux1, gx1, g1 = _value_and_grads(single, x, r)
  y2, aux2, gx2, g2 = _value_and_grads(par, x, r)
  # y and dx typed as x (unsplit; the shard_map's output is split over the whole mesh).
  assert jax.typeof(y2).sharding.spec == jax.typeof(x).sharding.spec, jax.typeof(y2)
  assert jax.typeof(gx2).sharding.spec == jax.typeof(x).sharding.spec, jax.typeof(gx2)
  scale = lambda v: 1e-5 * float(jnp.abs(v).max())
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=scale(y1))
  np.testing.assert_allclose(aux2, aux1, rtol=1e-6)
  np.testing.assert_allclose(gx2, gx1, rtol=1e-5, atol=scale(gx1))
  assert set(g2) == set(g1)
  fp8_weights = [n for n in g1 if impl == "fp8" and n != "router"]
  for name in g1:
    assert float(jnp.abs(g1[name]).max()) > 0, name
    if name in fp8_weights:
      assert oracle.calc_diff(g2[name], g1[name]) < 2e-3, (name, oracle.calc_diff(g2[name], g1[name]))
    else:
      np.testing.assert_allclose(g2[name], g1[name], rtol=1e-5, atol=scale(g1[name]), err_msg=name)
  if fp8_weights:
    # Both FP8 layers within the FP8 bound of the exact (dense f64-like) gradients.
    _, _, _, exact = reference_value_and_grads(single, x, r)
    for name in fp8_weights:
      for grads in (g1, g2):
        assert oracle.calc_diff(grads[name], exact[name]) < FP8_LAYER_TOL, name

  # Expert weight gradients stay split like the weights; the forward exchanges tokens
  # (all_to_all of the rows there and back, of the counts) and gathers nothing.
  assert g2["w_gate_up"].sharding.is_equivalent_to(by_expert, 3), g2["w_gate_up"].sharding
  forward = nnx.jit(lambda m, x: m(x))
  counts = multidevice.collectives(forward.lower(par, x).compile().as_text())
  # On Explicit axes y is typed as x: unsplit here, so one all-gather of y brings it back.
  typed = jax.sharding.AxisType.Explicit in mesh.axis_types
  assert counts["all-to-all"] == 3 and counts["all-gather"] == int(typed), counts
  if typed:  # tokens split as the shard_map splits them: nothing gathered
    with jax.set_mesh(mesh):
      xs = jax.device_put(x.reshape(-1, h), NamedSharding(mesh, P(("data", "expert"))))
      counts = multidevice.collectives(forward.lower(par, xs).compile().as_text())
    assert counts["all-to-all"] == 3 and counts["all-gather"] == 0, counts


def case_training(steps=4):
  # A few SGD steps: the same losses and parameters with and without the mesh. (SGD: Adam
  # divides by the gradients' magnitude, which blows float noise of ~0 gradients up to
  # learning-rate-sized steps.)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax_deepgemm import expert_parallel

  x = jax.random.normal(jax.random.key(0), (256, 32))
  target = jnp.tanh(x @ jax.random.normal(jax.random.key(1), (32, 32)) / 32 ** 0.5)

  @nnx.jit
  def step(model, opt, x, target):
    def loss_fn(model):
      y, aux = model(x)
      return jnp.mean((y - target) ** 2) + aux
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  runs = {}
  for name, mesh in (("single", None), ("parallel", expert_parallel.make_mesh(data=2, expert=4))):
    model = _moe(mesh, "bf16", 32, 32, 8, 2, num_shared_experts=1)
    opt = nnx.Optimizer(model, optax.sgd(0.2), wrt=nnx.Param)
    losses = [float(step(model, opt, x, target)) for _ in range(steps)]
    runs[name] = losses, nnx.to_pure_dict(nnx.state(model, nnx.Param))
  (l1, p1), (l2, p2) = runs["single"], runs["parallel"]
  assert l1[-1] < l1[0]  # it trains
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for name in p1:
    np.testing.assert_allclose(p2[name], p1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def case_micro_batches():
  # The training job's gradient accumulation on a data x expert mesh: each micro-batch's rows
  # split over all 8 devices, the FP8 weights cast once per step (before the scan) and split
  # over the experts like the weights. The single-device job's loss and gradients (the expert
  # weights' within an FP8 rounding: see the module's docstring), in DeepGEMM's measure.
  import dataclasses
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  import oracle
  from jax_deepgemm import expert_parallel, train
  cfg = dataclasses.replace(train.Config(), hidden=32, heads=2, layers=2, experts=8,
                            expert_width=64, seq=16, batch=32, micro_batches=2)
  tokens = train.MarkovLanguage(cfg.vocab).batch(cfg.batch, cfg.seq + 1)
  grads = nnx.jit(train.micro_batch_grads, static_argnums=2)
  runs = {}
  for name, mesh in (("single", None), ("parallel", expert_parallel.make_mesh(data=2, expert=4))):
    model = train.make_model(cfg, "fp8", mesh=mesh)
    toks = (jnp.asarray(tokens) if mesh is None else
            jax.device_put(tokens, NamedSharding(mesh, P(mesh.axis_names))))
    runs[name] = grads(model, toks, cfg.micro_batches)
  (ce1, g1), (ce2, g2) = runs["single"], runs["parallel"]
  np.testing.assert_allclose(ce2, ce1, rtol=1e-5)
  for (path, a), b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g2)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:  # exactly 0 (softmax ignores what every key adds): noise
      continue
    tol = 2e-3 if "['w_gate_up']" in name or "['w_down']" in name else 1e-5
    assert oracle.calc_diff(b, a) < tol, (name, oracle.calc_diff(b, a))


def case_placement():
  # Each device keeps only its experts also where the layer is built traced: under nnx.jit
  # (sharded init; device_put left them replicated) and stacked by nnx.vmap for nnx.scan
  # (the experts are then axis 1; device_put split the stacked axis, or failed on 3 layers).
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType
  from jax_deepgemm import expert_parallel
  for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2,
                (AxisType.Explicit, AxisType.Auto)):
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=types)
    make = lambda rngs: _moe(mesh, "fp8", 64, 32, 8, 2)
    with jax.set_mesh(mesh):
      eager = make(None)
      built = nnx.jit(lambda: make(None))()
      for m in (eager, built):
        for name in ("w_gate_up", "w_down"):
          w = getattr(m, name)[...]
          assert {s.data.shape[0] for s in w.addressable_shards} == {2}, (types, name, w.sharding)
      np.testing.assert_array_equal(np.asarray(built.w_gate_up[...]), np.asarray(eager.w_gate_up[...]))
      for layers in (4, 3):
        @nnx.vmap(in_axes=0, out_axes=0)
        def stack(key):
          from jax_deepgemm.flax import MoE
          return MoE(64, 32, 8, 2, rngs=nnx.Rngs(key), dtype=jnp.float32, mesh=mesh)
        stacked = stack(jax.random.split(jax.random.key(0), layers))
        w = stacked.w_gate_up[...]
        assert {s.data.shape[:2] for s in w.addressable_shards} == {(layers, 2)}, (types, w.sharding)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def forward(layer, h):
          return h + layer(h)[0]  # (y typed as h: a scan carry)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 64)), jnp.float32)
        y = nnx.jit(forward)(stacked, x)
        assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  print("ok")


def case_partition_metadata():
  # Flax's sharding recipes read the Params' metadata: sharded init (nnx.jit a constructor,
  # then with_sharding_constraint(state, nnx.get_partition_spec(state))) and restoring into
  # an abstract model (nnx.get_named_sharding). The expert weights had none, so both read P()
  # and replicated them on every device (and Adam's moments with them), silently.
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jax_deepgemm import expert_parallel
  from jax_deepgemm.flax import MoE
  mesh = expert_parallel.make_mesh(data=2, expert=4)
  make = lambda key=0: MoE(64, 32, 8, 2, rngs=nnx.Rngs(key), num_shared_experts=1, mesh=mesh)
  experts = ("w_gate_up", "w_down")
  want = {n: P("expert", None, None) if n in experts else P()
          for n in experts + ("router", "shared_gate_up", "shared_down")}
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(make())))
  assert specs == want, specs
  shardings = nnx.to_pure_dict(nnx.get_named_sharding(nnx.state(nnx.eval_shape(make)), mesh))
  assert shardings == {n: NamedSharding(mesh, s) for n, s in want.items()}, shardings
  assert nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(MoE(64, 32, 8, 2, rngs=nnx.Rngs(0))))) \
      == dict.fromkeys(("router",) + experts, P())  # (no mesh: nothing split)

  @nnx.jit
  def create():
    model = make()
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model
  with jax.set_mesh(mesh):
    model = create()
  eager = make()
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  for name in experts:  # 8 experts over 4 devices: 2 each, weights and Adam's moments
    for w in (getattr(model, name)[...], opt.opt_state[0].mu[name][...]):
      assert {s.data.shape[0] for s in w.addressable_shards} == {2}, (name, w.sharding)
    np.testing.assert_array_equal(np.asarray(getattr(model, name)[...]),
                                  np.asarray(getattr(eager, name)[...]))
  assert {s.data.shape for s in model.router[...].addressable_shards} == {(64, 8)}
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
  y, y_eager = (nnx.jit(lambda m, x: m(x)[0])(m, x) for m in (model, eager))
  np.testing.assert_allclose(y, y_eager, rtol=1e-5, atol=1e-6)  # (other partitioning)

  # Stacked for nnx.scan: with Flax's transform_metadata the spec names the layer axis too.
  @nnx.jit
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
  def stack(key):
    model = make(key)
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model
  with jax.set_mesh(mesh):
    stacked = stack(jax.random.split(jax.random.key(0), 3))
  assert nnx.get_partition_spec(nnx.state(stacked)).w_gate_up.get_value() == P(None, "expert", None, None)
  w = stacked.w_gate_up[...]
  assert {s.data.shape[:2] for s in w.addressable_shards} == {(3, 2)}, w.sharding
  print("ok")


def case_empty_batch():
  # 0 tokens: an empty y, aux 0 and zero gradients, eager as under nnx.jit. (Eager nnx.grad
  # failed inside Shardy: "'func.call' op expected at least one operand ... GlobalToLocalShape".)
  import jax
  from jax.sharding import AxisType
  import contextlib
  for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=types)
    # (JAX's eager grad of a result typed on Explicit axes needs the mesh set, any layer.)
    explicit = AxisType.Explicit in types
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
      _empty_batch_grads(mesh, types)
  print("ok")


def case_eager_grads():
  # Eager (not jitted) nnx.value_and_grad: the shard_map ran op by op, and jax 0.11.2's
  # XLA:CPU crashed compiling one of the backward's ops (a segfault). The single-device
  # layer's values and gradients, on Auto and Explicit meshes.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType
  import oracle
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  def f(m, x):
    y, aux = m(x)
    return jnp.sum(y * r) + aux, y
  grad = nnx.value_and_grad(f, argnums=(0, 1), has_aux=True)
  for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=types)
    for impl in ("fp8", "bf16"):
      single, par = _moe(None, impl, 64, 32, 8, 2), _moe(mesh, impl, 64, 32, 8, 2)
      (_, y1), (g1, gx1) = grad(single, x)
      with jax.set_mesh(mesh):
        (_, y2), (g2, gx2) = grad(par, x)
      scale = lambda v: 1e-5 * float(jnp.abs(v).max())
      np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=scale(y1))
      np.testing.assert_allclose(gx2, gx1, rtol=1e-5, atol=scale(gx1))
      g1, g2 = nnx.to_pure_dict(g1), nnx.to_pure_dict(g2)
      for name in g1:
        assert oracle.calc_diff(g2[name], g1[name]) < 2e-3, (types, impl, name)
  print("ok")


def _empty_batch_grads(mesh, types):
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  for impl in ("bf16", "fp8"):
    model = _moe(mesh, impl, 32, 32, 8, 2, num_shared_experts=1)
    def f(m, x):
      y, aux = m(x)
      return jnp.sum(y) + aux, (y, aux)
    for grad in (nnx.value_and_grad, lambda f, **kw: nnx.jit(nnx.value_and_grad(f, **kw))):
      for x in (jnp.zeros((0, 32)), jnp.zeros((3, 0, 32))):
        (loss, (y, aux)), g = grad(f, has_aux=True)(model, x)
        assert y.shape == x.shape and float(aux) == 0 and float(loss) == 0, (types, impl)
        g, p = nnx.to_pure_dict(g), nnx.to_pure_dict(nnx.state(model, nnx.Param))
        assert set(g) == set(p)
        for name in g:
          assert g[name].shape == p[name].shape and not np.any(np.asarray(g[name])), name


def case_errors():
  import jax
  import jax.numpy as jnp
  import pytest as pt
  from flax import nnx
  from jax_deepgemm import expert_parallel
  from jax_deepgemm.flax import MoE
  mesh = expert_parallel.make_mesh(data=2, expert=4)
  with pt.raises(ValueError, match=r"num_experts \(6\) must be divisible .* \(4\)"):
    MoE(32, 32, 6, 2, rngs=nnx.Rngs(0), mesh=mesh)
  with pt.raises(ValueError, match="expert_axis 'experts' is not an axis"):
    MoE(32, 32, 8, 2, rngs=nnx.Rngs(0), mesh=mesh, expert_axis="experts")
  with pt.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    MoE(32, 32, 8, 2, rngs=nnx.Rngs(0), mesh="data=2,expert=4")
  moe = MoE(32, 32, 8, 2, rngs=nnx.Rngs(0), mesh=mesh)
  with pt.raises(ValueError, match="12 tokens must split evenly over the mesh's 8 devices"):
    moe(jnp.zeros((3, 4, 32)))
  with pt.raises(ValueError, match=r"data \(3\) x expert \(0\)"):
    expert_parallel.make_mesh(data=3)
  with pt.raises(ValueError, match="must equal the number of devices"):
    expert_parallel.make_mesh(data=2, expert=2)
  assert dict(expert_parallel.make_mesh().shape) == {"data": 1, "expert": 8}
  assert dict(expert_parallel.make_mesh(expert=2).shape) == {"data": 4, "expert": 2}
  # The training job: the batch must split over the devices; --mesh auto puts as many
  # devices on the expert axis as divide the expert count.
  import dataclasses
  from jax_deepgemm import train
  cfg = dataclasses.replace(train.Config(), batch=12, experts=4)
  with pt.raises(ValueError, match=r"batch \(12\) must split evenly over the mesh's 8"):
    train.train(cfg, "fp8", mesh=mesh)
  with pt.raises(ValueError, match=r"each micro-batch \(4\) must split evenly over the mesh's 8"):
    train.train(dataclasses.replace(train.Config(), micro_batches=4), "fp8", mesh=mesh)
  assert dict(train.parse_mesh("auto", cfg).shape) == {"data": 2, "expert": 4}
  assert dict(train.parse_mesh("data=4", cfg).shape) == {"data": 4, "expert": 2}
  del jax


if __name__ == "__main__":
  multidevice.main(globals())
