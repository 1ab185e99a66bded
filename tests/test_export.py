"""jax.export of code that uses jax_deepgemm (no GPU needed).

The CUDA lowering is taken as if a Hopper GPU were present (``use_kernels`` patched), so these
tests see the custom calls a GPU machine would export, without running them.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_deepgemm as jd
import multidevice
from jax_deepgemm import _ffi, _tiled_groups
from helpers import quant_act, quant_w, randn


def _loss_linear(x, w, b):
  return jnp.sum(jd.fp8_linear(x, w, b).astype(jnp.float32) ** 2)


def _loss_grouped(x, w, gs):
  return jnp.sum(jd.fp8_grouped_linear(x, w, gs).astype(jnp.float32) ** 2)


def _cases(rng):
  """(jitted function, args): together they lower to every FFI target we register."""
  x = randn(rng, (256, 512), jnp.bfloat16)
  w = randn(rng, (512, 384), jnp.bfloat16, scale=0.05)
  b = randn(rng, (384,), jnp.bfloat16)
  xg = randn(rng, (640, 256), jnp.bfloat16)
  wg = randn(rng, (3, 256, 384), jnp.bfloat16, scale=0.05)
  gs = jnp.asarray([300, 0, 340], jnp.int32)
  a, sa = quant_act(rng, 4 * 128, 256)
  bm, sbm = quant_w(rng, 4, 384, 256)
  am, sam = a.reshape(4, 128, 256), sa.reshape(4, 128, -1)
  mm = jnp.asarray([128, 0, 7, 100], jnp.int32)
  # The MoE layer's gradient: its dispatch and combine gathers are read by gathered casts.
  from flax import nnx
  from jax_deepgemm.flax import MoE
  graph, params, rest = nnx.split(MoE(256, 128, 4, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
  moe_loss = lambda p, x: jnp.sum(nnx.merge(graph, p, rest)(x)[0].astype(jnp.float32) ** 2)
  return [
      (jax.jit(jax.value_and_grad(_loss_linear, argnums=(0, 1, 2))), (x, w, b)),
      (jax.jit(jax.value_and_grad(_loss_grouped, argnums=(0, 1))), (xg, wg, gs)),
      (jax.jit(lambda *z: jd.m_grouped_fp8_gemm_nt_masked(*z, expected_m=64)),
       (am, sam, bm, sbm, mm)),
      (jax.jit(lambda o, *z: jd.m_grouped_fp8_gemm_nt_masked(*z, expected_m=64, out=o)),
       (jnp.ones(am.shape[:2] + bm.shape[1:2], jnp.bfloat16), am, sam, bm, sbm, mm)),
      (jax.jit(jd.per_token_cast_to_fp8), (x,)),
      (jax.jit(jd.per_block_cast_to_fp8), (w,)),
      (jax.jit(jd.per_token_cast_transpose_to_fp8), (x,)),
      (jax.jit(jax.grad(moe_loss)), (params, randn(rng, (64, 256), jnp.bfloat16))),
  ]


def _targets(exported):
  return set(re.findall(r"custom_call @(jax_deepgemm_\w+)", exported.mlir_module()))


def test_cuda_export_needs_and_takes_our_safety_checks(rng, monkeypatch):
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)  # lower as on a Hopper GPU
  seen = set()
  for fn, args in _cases(rng):
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
      export.export(fn, platforms=("cuda",))(*args)
    exp = export.export(fn, platforms=("cuda",),
                        disabled_checks=jd.export_safety_checks())(*args)
    assert _targets(exp) <= set(_ffi.FFI_TARGETS)
    seen |= _targets(exp)
  # Every target is reachable from the public API, and the list names no stale one.
  assert seen == set(_ffi.FFI_TARGETS)


def test_ffi_targets_are_the_extensions():
  if not jd.extension_built():
    pytest.skip("needs the CUDA extension (CI builds it)")
  assert set(_ffi._C.registrations()) == set(_ffi.FFI_TARGETS)


@pytest.mark.parametrize("platforms", [("cpu",), ("cpu", "cuda")])
def test_export_runs_where_the_kernels_do_not(rng, platforms):
  # Without a Hopper GPU every op lowers to plain JAX: no custom call, no check to disable,
  # and the exported module computes what the jitted function does.
  if _ffi.use_kernels():
    pytest.skip("a machine without our kernels (here cuda lowers to them, and a module "
                "exported for cpu alone cannot run on the GPU)")
  for fn, args in _cases(rng)[:3]:
    exp = export.export(fn, platforms=platforms)(*args)
    assert not _targets(exp)
    got, want = exp.call(*args), fn(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == w.shape and g.dtype == w.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=1e-6, atol=1e-6)


# Primitives that JAX lowers for CUDA otherwise than for CPU and that a reference could reach
# (jax 0.11.2: cumsum lowers to a chlo.scan composite for CUDA; the others may follow).
_LOWERED_PER_PLATFORM = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


def _eqns(jaxpr, in_jit=False):
  """(equation, whether inside a nested jit) for every equation, nested ones too."""
  for eqn in jaxpr.eqns:
    yield eqn, in_jit
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)  # (a ClosedJaxpr's)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub, in_jit or eqn.primitive.name in ("jit", "pjit"))


def test_references_call_no_jitted_helper_lowered_per_platform(rng):
  # Exported for ("cpu", "cuda") without our kernels, the grouped layer aborted the process
  # when called on CPU (jax 0.11.2: test_export_runs_where_the_kernels_do_not took pytest
  # down): XLA:CPU cannot compile the chlo.scan composite that JAX lowers cumsum to for CUDA
  # ("ComputeOutputToInputIndexing is not implemented for opcode call", then a failed
  # check), and the CPU branch of our ops called the jnp.cumsum (a jax.jit) lowered for the
  # CUDA branch: JAX caches a nested jit's lowering per module, not per platform. Minimal
  # reproduction, plain JAX: a primitive p with
  #   ref = mlir.lower_fun(jnp.cumsum, multiple_results=False)
  #   mlir.register_lowering(p, ref)
  #   mlir.register_lowering(p, lambda ctx, x: ref(ctx, x), platform="cuda")
  # then export.export(jax.jit(p.bind), platforms=("cpu", "cuda"))(x).call(x) aborts. Whether
  # a module aborts depends on XLA's fusion; so this checks the cause: the references (what
  # each op lowers to off our kernels) call no such primitive inside a nested jit (jnp.cumsum,
  # jnp.repeat with total_repeat_length did), only at their top level (lax.cumsum), where
  # JAX lowers it per platform. (See _primitive.register_lowerings.)
  a, sa = quant_act(rng, 512, 128)
  b, sb = quant_w(rng, 8, 128, 128)
  gs = jnp.asarray([100, 0, 57, 3, 200, 1, 0, 30], jnp.int32)
  assert _tiled_groups.worth_tiling(512, 8)  # the M-grouped reference's tiled path too
  seen = set()
  for fn, args in _cases(rng) + [(jax.jit(jd.m_grouped_fp8_gemm_nt_contiguous),
                                  (a, sa, b, sb, gs))]:
    for eqn, _ in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
      reference = getattr(eqn.primitive, "reference", None)
      if reference is None:
        continue
      seen.add(eqn.primitive.name.removesuffix("_local"))
      avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
      lowered = jax.make_jaxpr(lambda *x: reference(*x, **eqn.params))(*avals)
      inside = {e.primitive.name for e, in_jit in _eqns(lowered.jaxpr) if in_jit}
      assert not inside & _LOWERED_PER_PLATFORM, (eqn.primitive.name, inside)
  assert len(seen) >= 8, seen  # the GEMMs (dense, M-grouped, masked, K-grouped), the casts


def test_export_of_a_sharded_computation():
  # The ops' partitioning rules (custom_partitioning) are a Python callback, which an
  # exported module cannot carry: exported over several devices, the ops lower without
  # them and XLA partitions what they lower to.
  multidevice.run(__file__, "case_sharded_export", devices=2)


def case_sharded_export():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  for fn, args in _cases(np.random.default_rng(0))[:3]:
    # The first operand split by rows (or groups), the rest replicated.
    args = tuple(jax.device_put(a, NamedSharding(mesh, P("d") if i == 0 else P()))
                 for i, a in enumerate(args))
    exp = export.export(fn, platforms=("cpu",))(*args)
    assert exp.nr_devices == 2 and not _targets(exp)
    got, want = exp.call(*args), fn(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == w.shape and g.dtype == w.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=1e-6, atol=1e-6)
  print("ok")


def _cuda_module(fn, *args):
  exp = export.export(jax.jit(fn), platforms=("cuda",),
                      disabled_checks=jd.export_safety_checks())(*args)
  return exp.mlir_module()


def _scale_transposes(module):
  """f32 transposes in a module: of scales, since no other f32 operand is transposed."""
  return len(re.findall(r"stablehlo\.transpose .*tensor<[0-9x]*xf32>", module))


@pytest.mark.parametrize("m", [128, 7])
def test_mn_major_scales_skip_the_transpose(rng, monkeypatch, m):
  # MN-major scales (the default; JAX_DEEPGEMM_MN_MAJOR_SCALES=0 is off): the cast declares its
  # scales column-major and the GEMM takes them with that layout, so where M % 4 == 0 nothing
  # transposes them in between.
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  x = randn(rng, (m, 640), jnp.bfloat16)
  wq, ws = quant_w(rng, 384, 640)
  xg = randn(rng, (2 * m, 640), jnp.bfloat16)
  bg, sbg = quant_w(rng, 3, 256, 640)
  gs = jnp.asarray([m, 0, m], jnp.int32)
  dense = lambda x: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8(x), wq, ws)
  grouped = lambda x: jd.m_grouped_fp8_gemm_nt_contiguous(
      *jd.per_token_cast_to_fp8(x), bg, sbg, gs)
  dual = lambda x: jd.fp8_gemm_nt(*jd.per_token_cast_to_fp8_and_transpose(x)[:2], wq, ws)
  counts = {}
  for on in ("0", "1"):
    monkeypatch.setenv(_ffi.MN_MAJOR_SCALES_ENV, on)
    jax.clear_caches()
    mods = [_cuda_module(dense, x), _cuda_module(grouped, xg), _cuda_module(dual, x)]
    counts[on] = [_scale_transposes(mod) for mod in mods]
    layouts = [re.findall(r"custom_call @jax_deepgemm_\w+.*", mod) for mod in mods]
    for calls in layouts:
      cast, gemm = calls[0], calls[-1]
      # The cast's scales (its second result) and the GEMM's sa (its second operand).
      mn_major = on == "1"
      assert ("result_layouts = [dense<[1, 0]> : tensor<2xindex>, dense<[0, 1]>" in cast or
              "result_layouts = [dense<[2, 1, 0]> : tensor<3xindex>, dense<[1, 0, 2]>" in cast
              ) == mn_major, cast
      assert ("operand_layouts = [dense<[1, 0]> : tensor<2xindex>, dense<[0, 1]>" in gemm
              ) == (mn_major and m % 4 == 0), gemm
  assert counts["0"] == [1, 1, 1]
  assert counts["1"] == ([0, 0, 0] if m % 4 == 0 else [1, 1, 1])


def _symbolic_cases():
  """(name, function, argument specs with symbolic dims, expected FFI targets)."""
  b, t, g = export.symbolic_shape("b, t, g")
  S, e4, f32, bf = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16
  M, N, K, G = 8, 136, 256, 3
  gemm, grouped = "jax_deepgemm_fp8_gemm_nt", "jax_deepgemm_m_grouped_fp8_gemm_nt"
  return [
      # Tokens: a MoE layer exported for any number of tokens (forward and backward).
      ("grouped layer, tokens", jax.value_and_grad(_loss_grouped, argnums=(0, 1)),
       (S((t, K), bf), S((G, K, N), bf), S((G,), jnp.int32)),
       {grouped, "jax_deepgemm_k_grouped_fp8_gemm_tn"}),
      ("dense layer, tokens", jax.value_and_grad(_loss_linear, argnums=(0, 1, 2)),
       (S((t, K), bf), S((K, N), bf), S((N,), bf)), {gemm}),
      # A batch whose size may pass the group table's: the batching rules loop.
      ("vmap gemm, per-example weights", jax.vmap(jd.fp8_gemm_nt),
       (S((b, M, K), e4), S((b, M, 2), f32), S((b, N, K), e4), S((b, 2, 2), f32)), {gemm}),
      ("vmap layer, per-example weights", jax.vmap(jd.fp8_linear),
       (S((b, M, K), bf), S((b, K, N), bf)), {gemm}),
      ("vmap masked", jax.vmap(jd.m_grouped_fp8_gemm_nt_masked),
       (S((b, G, M, K), e4), S((b, G, M, 2), f32), S((b, G, N, K), e4), S((b, G, 2, 2), f32),
        S((b, G), jnp.int32)), {grouped}),
      # Groups: the kernel's handler checks the count at run time.
      ("masked, groups", jd.m_grouped_fp8_gemm_nt_masked,
       (S((g, M, K), e4), S((g, M, 2), f32), S((g, N, K), e4), S((g, 2, 2), f32),
        S((g,), jnp.int32)), {grouped}),
  ]


@pytest.mark.parametrize("case", range(6))
def test_symbolic_shapes_lower_to_the_kernels(monkeypatch, case):
  # Shape-polymorphic export lowers to our kernels (the sizes they take as attributes are
  # static, or not needed), instead of failing on a comparison of a symbolic size.
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  name, fn, specs, targets = _symbolic_cases()[case]
  exp = export.export(jax.jit(fn), platforms=("cuda",),
                      disabled_checks=jd.export_safety_checks())(*specs)
  assert targets <= _targets(exp), (name, _targets(exp))


def test_symbolic_masked_rows_need_a_number(monkeypatch):
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  m, = export.symbolic_shape("m")
  S, e4, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
  specs = (S((2, m, 256), e4), S((2, m, 2), f32), S((2, 128, 256), e4), S((2, 1, 2), f32),
           S((2,), jnp.int32))
  with pytest.raises(ValueError, match="m_grouped_fp8_gemm_nt_masked: the Hopper kernel needs M_max"):
    export.export(jax.jit(jd.m_grouped_fp8_gemm_nt_masked), platforms=("cuda",),
                  disabled_checks=jd.export_safety_checks())(*specs)


@pytest.mark.parametrize("case, one", [(2, jd.fp8_gemm_nt), (3, jd.fp8_linear),
                                       (4, jd.m_grouped_fp8_gemm_nt_masked)])
def test_symbolic_batch_runs_as_jit(rng, case, one):
  # On CPU (the reference lowering), the module exported for any batch computes, at a
  # concrete one, what the unbatched function does per example.
  _, fn, specs, _ = _symbolic_cases()[case]
  exp = export.export(jax.jit(fn), platforms=("cpu",))(*specs)
  args = []
  for spec in specs:
    shape = tuple(3 if not isinstance(d, int) else d for d in spec.shape)
    if spec.dtype == jnp.int32:
      args.append(jnp.asarray(rng.integers(-2, 12, shape), jnp.int32))
    elif spec.dtype == jnp.float32:
      args.append(jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32))
    else:
      args.append(randn(rng, shape, jnp.float32).astype(spec.dtype))
  with jax.default_device(jax.devices("cpu")[0]):  # (also on a GPU machine)
    args = jax.device_put(args, jax.devices("cpu")[0])
    got = exp.call(*args)
    want = jnp.stack([jax.jit(one)(*(a[i] for a in args)) for i in range(3)])
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn,shape,target", [
    (jd.per_token_cast_to_fp8_and_transpose, (2**24, 64), "jax_deepgemm_dual_cast"),
    (lambda x: jd.per_token_cast_to_fp8(x, axis=0), (2**25, 2), "jax_deepgemm_token_axis_cast"),
    (jd.per_block_cast_to_fp8, (1, 2**24), "jax_deepgemm_per_block_cast"),
    (jd.per_block_cast_to_fp8_and_transpose, (1, 2**24), "jax_deepgemm_per_block_dual_cast"),
])
def test_casts_past_the_kernels_32_bit_offsets_take_the_reference(monkeypatch, fn, shape, target):
  # (The handlers refuse these sizes at run time, "too large": fp8_linear's backward on 2**24
  # tokens failed only when it ran. Past the bounds the cast lowers to the reference.)
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  lower = lambda s: _targets(export.export(jax.jit(fn), platforms=("cuda",),
                                           disabled_checks=jd.export_safety_checks())(
                                               jax.ShapeDtypeStruct(s, jnp.bfloat16)))
  assert target in lower((256, 256))
  assert target not in lower(shape)


@pytest.mark.parametrize("expected_m", [2**63, 2**70])
def test_masked_expected_m_past_int64_is_clipped(rng, monkeypatch, expected_m):
  # (np.int64(expected_m) raised a bare OverflowError at lowering.) The handler takes
  # min(expected_m, M_max) anyway, so the attribute is clipped to M_max.
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  a, sa = quant_act(rng, 2 * 128, 256)
  b, sb = quant_w(rng, 2, 384, 256)
  mod = _cuda_module(lambda *z: jd.m_grouped_fp8_gemm_nt_masked(*z, expected_m=expected_m),
                     a.reshape(2, 128, 256), sa.reshape(2, 128, -1), b, sb,
                     jnp.asarray([128, 7], jnp.int32))
  assert re.search(r"expected_m = 128 : i64", mod), mod


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_symbolic_groups_of_the_running_sum_need_a_number(monkeypatch, platform):
  # The group sizes' saturating running sum (the K-grouped op clips its sizes with it, the
  # M-grouped reference finds each row's group with it) is an associative_scan, which needs
  # the length: a symbolic G failed inside it with a bare NotImplementedError.
  monkeypatch.setattr(_ffi, "use_kernels", lambda: platform == "cuda")
  g, = export.symbolic_shape("g")
  S, e4, f32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32
  k_specs = (S((256, 64), e4), S((2, 64), f32), S((256, 96), e4), S((2, 96), f32),
             S((g,), jnp.int32))
  m_specs = (S((256, 128), e4), S((256, 1), f32), S((g, 64, 128), e4), S((g, 1, 1), f32),
             S((g,), jnp.int32))
  cases = [(jd.k_grouped_fp8_gemm_tn_contiguous, k_specs)]
  if platform == "cpu":  # (the M-grouped kernel takes a symbolic G: _symbolic_cases)
    cases.append((jd.m_grouped_fp8_gemm_nt_contiguous, m_specs))
  for fn, specs in cases:
    with pytest.raises(ValueError, match=f"{fn.__name__}: group_sizes needs a known number "
                                         "of groups G, got the symbolic g"):
      export.export(jax.jit(fn), platforms=(platform,),
                    disabled_checks=jd.export_safety_checks())(*specs)


class _DenseOnlyOverride:
  """The extension's config selection (``_C``) as it answers where JAX_DEEPGEMM_GEMM_CONFIG
  names a dense-only tile (block_n=32) and, with ``bad_k_grouped``, JAX_DEEPGEMM_K_GROUPED_CONFIG
  no tile at all; tests/test_config.py asks the real one."""

  def __init__(self):
    self.asked, self.bad_k_grouped = [], False

  def gemm_config(self, m, n, k, groups, accumulate, masked, f32_out):
    self.asked.append((m, n, k, groups, accumulate, masked, f32_out))
    if groups:
      raise ValueError("jax_deepgemm: JAX_DEEPGEMM_GEMM_CONFIG='block_n=32' matches no grouped "
                       "kernel that is built; supported: block_m=64,block_n=64,...")
    return "block_m=64,block_n=32,stages=18,multicast=1"

  def k_grouped_config(self, groups, n, k):
    if not self.bad_k_grouped:
      return "block_m=128,block_n=128,stages=5"
    raise ValueError("jax_deepgemm: invalid JAX_DEEPGEMM_K_GROUPED_CONFIG='block_m=96': "
                     "expected block_m=64, 128 or 192 (block_n=128)")


def test_config_override_for_another_table_fails_at_lowering(rng, monkeypatch):
  # An override that matches no kernel of an op's table failed every call of it at run time,
  # in the handler ("matches no grouped kernel that is built"); the lowering asks the same
  # selection now, so jit / export fail with it, naming the op.
  monkeypatch.setattr(_ffi, "use_kernels", lambda: True)
  fake = _DenseOnlyOverride()
  monkeypatch.setattr(_ffi, "_C", fake)
  cases = _cases(rng)
  # Dense GEMMs (the linear layer): their table has the tile.
  _cuda_module(cases[0][0], *cases[0][1])
  assert fake.asked and not any(q[3] for q in fake.asked)
  with pytest.raises(ValueError, match="m_grouped_fp8_gemm_nt: JAX_DEEPGEMM_GEMM_CONFIG="
                                       "'block_n=32' matches no grouped kernel"):
    # (masked, expected_m=64: asked about 64 rows in each of 4 groups)
    _cuda_module(cases[2][0], *cases[2][1])
  assert fake.asked[-1] == (64, 384, 256, 4, False, True, False)
  with pytest.raises(ValueError, match="m_grouped_fp8_gemm_nt: JAX_DEEPGEMM_GEMM_CONFIG"):
    _cuda_module(cases[1][0], *cases[1][1])  # the grouped layer: contiguous
  a, sa = quant_act(rng, 256, 64, axis=0)
  fake.bad_k_grouped = True
  with pytest.raises(ValueError, match="k_grouped_fp8_gemm_tn_contiguous: invalid "
                                       "JAX_DEEPGEMM_K_GROUPED_CONFIG='block_m=96'"):
    _cuda_module(jd.k_grouped_fp8_gemm_tn_contiguous, a, sa, a, sa,
                 jnp.asarray([100, 156], jnp.int32))
  # Symbolic sizes are asked about as 128 (whether a tile matches does not depend on them).
  fake.bad_k_grouped = False
  t, = export.symbolic_shape("t")
  with pytest.raises(ValueError, match="matches no grouped kernel"):
    export.export(jax.jit(_loss_grouped), platforms=("cuda",),
                  disabled_checks=jd.export_safety_checks())(
        jax.ShapeDtypeStruct((t, 256), jnp.bfloat16), *cases[1][1][1:])
  assert fake.asked[-1][0] == 128


if __name__ == "__main__":  # (last: the cases above must be defined when it runs)
  multidevice.main(globals())
