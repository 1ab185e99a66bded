"""Loads the CUDA extension (if it was built) and registers its XLA FFI targets.

Without the extension, or without a Hopper GPU, every op lowers to its pure-JAX
reference implementation; we say so once, at the first lowering that needs it.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import jax
import numpy as np
from jax import export as jax_export

logger = logging.getLogger("jax_deepgemm")

try:  # Built only when a CUDA toolkit was found at install time.
  _C = importlib.import_module("jax_deepgemm._C")
except ImportError as e:  # pragma: no cover - depends on the build
  _C = None
  _IMPORT_ERROR = str(e)
else:
  _IMPORT_ERROR = None
  for _name, _capsule in _C.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA", api_version=1)


# Every XLA FFI target our CUDA lowerings call (csrc/module.cc registers the same names).
FFI_TARGETS = (
    "jax_deepgemm_fp8_gemm_nt",
    "jax_deepgemm_m_grouped_fp8_gemm_nt",
    "jax_deepgemm_m_grouped_fp8_gemm_nt_into",
    "jax_deepgemm_k_grouped_fp8_gemm_tn",
    "jax_deepgemm_per_token_cast",
    "jax_deepgemm_per_block_cast",
    "jax_deepgemm_token_axis_cast",
    "jax_deepgemm_dual_cast",
    "jax_deepgemm_gathered_dual_cast",
    "jax_deepgemm_per_block_dual_cast",
)


def export_safety_checks() -> list:
  """``disabled_checks`` for ``jax.export.export`` of code that calls our CUDA kernels.

  ``jax.export`` refuses custom calls that have no compatibility guarantee, and ours have
  none: an exported module must run with the jax_deepgemm version that exported it (import
  it in the process that calls the module, which registers the kernels, and call
  ``use_kernels()`` once before the first call, which sets them up). Only lowerings for
  CUDA on a Hopper GPU contain our custom calls (see ``use_kernels``); exported for any other
  platform, or from a machine without Hopper, the ops are plain JAX and need no checks.

      exp = jax.export.export(jax.jit(f), platforms=("cuda",),
                              disabled_checks=jax_deepgemm.export_safety_checks())(*args)
  """
  return [jax_export.DisabledSafetyCheck.custom_call(name) for name in FFI_TARGETS]


def installed_extension_elsewhere(dist_name: str = "jax_deepgemm") -> str | None:
  """The directory of an installed ``jax_deepgemm`` that has the compiled extension, where it
  is not the package imported here (which has none); else None. Only for the warning above:
  mixing an installed ``_C`` with other sources could call kernels with other signatures."""
  from importlib import metadata
  try:
    files = metadata.distribution(dist_name).files or []
  except metadata.PackageNotFoundError:
    return None
  here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
  for f in files:
    parts = f.parts
    if len(parts) == 2 and parts[0] == "jax_deepgemm" and parts[1].startswith("_C."):
      pkg = os.path.realpath(os.path.dirname(str(f.locate())))
      if pkg != here and os.path.exists(str(f.locate())):
        return pkg
  return None


def extension_built() -> bool:
  """True when the package was installed with its CUDA kernels."""
  return _C is not None


@functools.lru_cache(maxsize=None)
def _hopper_present() -> bool:
  try:
    gpus = jax.local_devices(backend="gpu")
  except RuntimeError:
    return False
  return bool(gpus) and all(getattr(d, "compute_capability", "") == "9.0" for d in gpus)


def env_flag(name: str, default: bool) -> bool:
  """A boolean environment variable: unset or empty is ``default``; 1/true/yes/on and
  0/false/no/off (any case); anything else is an error (not a silent guess)."""
  v = os.environ.get(name, "").strip().lower()
  if v == "":
    return default
  if v in ("1", "true", "yes", "on"):
    return True
  if v in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"jax_deepgemm: {name}={os.environ[name]!r}: expected 1/0 (or true/false, "
                   "yes/no, on/off)")


@functools.lru_cache(maxsize=None)
def use_kernels() -> bool:
  """True when CUDA lowerings should call our kernels (extension built, Hopper GPU).

  ``JAX_DEEPGEMM_FORCE_REFERENCE=1`` forces the reference lowering everywhere.
  """
  if env_flag("JAX_DEEPGEMM_FORCE_REFERENCE", False):
    logger.warning("jax_deepgemm: JAX_DEEPGEMM_FORCE_REFERENCE is set; using the reference path.")
    return False
  if _C is None:
    elsewhere = installed_extension_elsewhere()
    if elsewhere:
      # The usual cause: `python -m ...` (or a script) run from the repository root imports the
      # source tree, which has no compiled _C, while `pip install .` put one in site-packages.
      logger.warning("jax_deepgemm: imported from %s, which has no compiled extension, but the "
                     "installed package at %s has one; GPU ops use the pure-JAX reference path. "
                     "Run outside the source tree (or `python -P`) to use the kernels.",
                     os.path.dirname(os.path.abspath(__file__)), elsewhere)
    else:
      logger.warning("jax_deepgemm: CUDA extension not built (%s); GPU ops use the pure-JAX "
                     "reference path.", _IMPORT_ERROR)
    return False
  if not _hopper_present():
    logger.warning("jax_deepgemm: no Hopper (sm_90) GPU; GPU ops use the pure-JAX reference path.")
    return False
  # Host-side setup now, at trace time: it is not allowed inside a CUDA-graph capture.
  # Only this process's GPUs: touching others would open contexts on them.
  try:
    _C.initialize([d.local_hardware_id for d in jax.local_devices(backend="gpu")])
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("jax_deepgemm: kernel setup failed (%s); GPU ops use the pure-JAX reference "
                   "path.", e)
    return False
  return True


MN_MAJOR_SCALES_ENV = "JAX_DEEPGEMM_MN_MAJOR_SCALES"


def mn_major_scales() -> bool:
  """Whether activation scales travel MN-major between our casts and GEMMs (read at lowering).

  The GEMMs read a 1x128 cast's scales MN-major, ``[ceil(K/128), M]``. By default the
  per-token casts write them so and declare that layout to XLA (``output_layouts``), and the
  GEMMs take ``sa`` with the same layout (``input_layouts``) where M % 4 == 0: a cast and a GEMM
  in one jit then need no transpose of the scales between them (XLA copies only where another
  consumer wants them row-major). ``JAX_DEEPGEMM_MN_MAJOR_SCALES=0`` goes back to row-major
  scales and a transpose inside each GEMM's lowering (the values and results are the same bits).
  """
  return env_flag(MN_MAJOR_SCALES_ENV, True)


def gemm_config(m: int, n: int, k: int, groups: int = 0, accumulate: bool = False,
                masked: bool = False, out_dtype=None) -> str:
  """The kernel config picked for this shape (for benchmarks and tuning); ``"reference"``
  without the extension.

  ``groups > 0`` asks about the M-grouped kernel with ``m`` rows in all, or with
  ``masked`` about the masked layout with ``m`` rows expected per group (``expected_m``);
  ``accumulate`` about the dense GEMM that adds into ``c``, and ``out_dtype`` float32 about
  a float32 output (their epilogues prefer other tiles; default: bfloat16, or float32 with
  ``accumulate``).
  """
  if _C is None:
    return "reference"
  f32_out = out_dtype is not None and np.dtype(out_dtype) == np.float32
  return _C.gemm_config(m, n, k, groups, accumulate, masked, f32_out)


def check_gemm_config(op: str, m, n, k, groups=0, *, accumulate=False, masked=False,
                      f32_out=False):
  """At lowering for the kernels: that JAX_DEEPGEMM_GEMM_CONFIG names a kernel built for ``op``.

  The handlers pick the kernel at run time, and an override that matches none of the op's table
  (e.g. ``block_n=32`` or ``block_m=192``, built for dense GEMMs only, on an M-grouped one)
  failed every call there; the same selection, asked here, fails the lowering. Whether an
  override matches does not depend on the sizes: a symbolic one (shape-polymorphic export) is
  asked as 128. Without the extension nothing is built to check against (and the reference
  lowering ignores the setting).
  """
  if _C is not None:
    dims = [d if isinstance(d, int) else 128 for d in (m, n, k, groups)]
    _raise_for(op, lambda: _C.gemm_config(*dims, accumulate, masked, f32_out))


def check_k_grouped_config(op: str, groups, n, k):
  """``check_gemm_config`` for the K-grouped kernel and JAX_DEEPGEMM_K_GROUPED_CONFIG."""
  if _C is not None:
    dims = [d if isinstance(d, int) else 128 for d in (groups, n, k)]
    _raise_for(op, lambda: _C.k_grouped_config(*dims))


def _raise_for(op, select):
  try:
    select()
  except ValueError as e:  # (the extension's message says what is wrong and what is built)
    raise ValueError(f"{op}: {str(e).removeprefix('jax_deepgemm: ')}") from None


def k_grouped_config(groups: int, n: int, k: int) -> str:
  """The tile picked for the K-grouped wgrad GEMM with a ``[groups, n, k]`` output
  (``"reference"`` without the extension)."""
  return _C.k_grouped_config(groups, n, k) if _C is not None else "reference"
