import os

import pytest

import jax_deepgemm as jd


@pytest.mark.skipif(os.environ.get("JAX_DEEPGEMM_REQUIRE_EXTENSION", "0") == "0",
                    reason="set JAX_DEEPGEMM_REQUIRE_EXTENSION=1 where the CUDA build is expected")
def test_cuda_extension_was_built():
  # CI sets this: a kernel that fails to compile must fail CI, not fall back silently.
  assert jd.extension_built()
  from jax_deepgemm import _C
  assert "jax_deepgemm_fp8_gemm_nt" in _C.registrations()
  assert "block_m" in jd.gemm_config(4096, 4096, 7168)


def test_public_api():
  for name in ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "fp8_gemm_nt",
               "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
               "k_grouped_fp8_gemm_tn_contiguous"]:
    assert callable(getattr(jd, name)), name


def _readme_section_python_blocks(heading):
  """The ```python blocks of README.md's section ``heading``, in order."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  if not os.path.exists(path):
    pytest.skip("README.md is not next to tests/ (installed tests)")
  text = open(path, encoding="utf-8").read()
  start = text.index(f"\n## {heading}\n")
  end = text.find("\n## ", start + 1)
  section = text[start:end if end >= 0 else len(text)]
  return [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]


def test_readme_api_examples_run():
  # The API section's examples run as written, one after another, as a reader would.
  import jax.numpy as jnp
  blocks = _readme_section_python_blocks("API")
  assert len(blocks) >= 2, blocks
  ns = {}
  for block in blocks:
    exec(compile(block, "README.md (API)", "exec"), ns)  # pylint: disable=exec-used
  assert ns["d"].shape == (4, 64, 384) and ns["dw"].dtype == jnp.bfloat16
  assert ns["dx"].dtype == jnp.bfloat16 and ns["dx"].shape == ns["x"].shape
  assert ns["dw_sum"].shape == ns["w"].shape and ns["dw_sum"].dtype == jnp.float32


def test_readme_moe_and_export_examples_run():
  # The MoE layer's example (section "Run") and the export one (after the API's examples, whose
  # x and w it takes), as written.
  import jax
  import jax.numpy as jnp
  ns = {}
  moe_blocks = _readme_section_python_blocks("Run")
  assert len(moe_blocks) == 1, moe_blocks
  exec(compile(moe_blocks[0], "README.md (Run)", "exec"), ns)  # pylint: disable=exec-used
  assert ns["y"].shape == ns["x"].shape == (2, 64, 1024) and ns["y"].dtype == jnp.bfloat16
  for block in _readme_section_python_blocks("API") + _readme_section_python_blocks(
      "What runs where"):
    exec(compile(block, "README.md (API)", "exec"), ns)  # pylint: disable=exec-used
  exp = ns["exp"]
  assert isinstance(exp, jax.export.Exported) and exp.platforms == ("cuda",)
  assert exp.out_avals[0].shape == ns["w"].shape  # dw


def test_readme_multi_gpu_example_runs():
  # Section "Multi-GPU"'s mesh example on 8 CPU devices, with the MoE example's imports.
  import subprocess
  import sys
  import multidevice  # noqa: PLC0415
  (imports,) = _readme_section_python_blocks("Run")
  mesh_block = _readme_section_python_blocks("Multi-GPU")[0]
  code = (imports.split("\nmoe = ")[0] + "\n" + mesh_block +
          "\nprint('shape', y.shape, y.dtype, float(aux_loss) > 0)\n")
  r = subprocess.run([sys.executable, "-c", code], env=multidevice.env(8), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "shape (8, 64, 1024) bfloat16 True" in r.stdout, r.stdout


def test_demo_runs_every_op_and_layer():
  import re
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "jax_deepgemm.demo", "--m", "256", "--n", "256",
                      "--k", "384", "--groups", "3"], capture_output=True, text=True, timeout=600,
                     cwd=os.path.dirname(__file__))
  assert r.returncode == 0, r.stderr[-2000:]
  for name in ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
               "k_grouped_fp8_gemm_tn_contiguous", "fp8_linear", "fp8_grouped_linear"):
    assert name in r.stdout, r.stdout
  diffs = [float(v) for v in re.findall(r"diff[^:]*: ([0-9.e+-]+)", r.stdout)]
  assert len(diffs) == 8 and all(0 < d < 2e-3 for d in diffs), r.stdout  # FP8's error, ~7e-4


@pytest.mark.parametrize("value,want", [("", True), ("1", True), ("true", True), ("ON", True),
                                        ("0", False), ("false", False), (" no ", False),
                                        ("off", False)])
def test_boolean_env_vars_read_words_too(monkeypatch, value, want):
  # (JAX_DEEPGEMM_MN_MAJOR_SCALES=false left MN-major scales on, and
  # JAX_DEEPGEMM_FORCE_REFERENCE=false forced the reference: only "0" meant no.)
  from jax_deepgemm import _ffi
  monkeypatch.setenv(_ffi.MN_MAJOR_SCALES_ENV, value)
  assert _ffi.mn_major_scales() is want


def test_boolean_env_vars_reject_other_values(monkeypatch):
  from jax_deepgemm import _ffi
  monkeypatch.setenv(_ffi.MN_MAJOR_SCALES_ENV, "maybe")
  with pytest.raises(ValueError, match="JAX_DEEPGEMM_MN_MAJOR_SCALES='maybe'"):
    _ffi.mn_major_scales()


def test_readme_api_examples_run_under_x64():
  # README (API): under jax_enable_x64 default-dtype arrays are float64, which the ops refuse as
  # c, bias or scales (TypeError, no downcast); the examples give c and bias as float32, so they
  # run there too, and the casts and layers take float64 inputs.
  import subprocess
  import sys
  import multidevice  # noqa: PLC0415
  code = "\n".join(_readme_section_python_blocks("API")) + """
import pytest
with pytest.raises(TypeError, match="fp8_gemm_nt: c must be float32, got float64"):
  jd.fp8_gemm_nt(xq, xs, wq, ws, c=jnp.zeros((M, N)))
with pytest.raises(TypeError, match="fp8_gemm_nt: bias must be float32 or bfloat16, got float64"):
  jd.fp8_gemm_nt(xq, xs, wq, ws, bias=jnp.ones((N,)))
with pytest.raises(TypeError, match="fp8_gemm_nt: sa must be float32, got float64"):
  jd.fp8_gemm_nt(xq, xs.tolist(), wq, ws)
x64 = jnp.ones((4, 256))
assert x64.dtype == jnp.float64 and jd.per_token_cast_to_fp8(x64)[1].dtype == jnp.float32
assert jd.fp8_linear(x64, jnp.ones((256, 8))).dtype == jnp.float64
print("x64 ok")
"""
  r = subprocess.run([sys.executable, "-c", code], env=multidevice.env(JAX_ENABLE_X64="1"),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "x64 ok" in r.stdout, r.stdout


def _fake_dist(root, name, files):
  """A minimal installed distribution ``name`` under ``root`` holding ``files``."""
  info = root / f"{name}-0.1.0.dist-info"
  info.mkdir()
  (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
  (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
  for f in files:
    (root / f).parent.mkdir(parents=True, exist_ok=True)
    (root / f).write_bytes(b"")


def test_warning_names_an_installed_extension_elsewhere(tmp_path, monkeypatch, caplog):
  # Run from a source tree (no _C) with the package pip-installed elsewhere, the reference
  # path used to be explained as "CUDA extension not built": the warning now says where the
  # kernels are and how to use them.
  import logging
  from jax_deepgemm import _ffi
  _fake_dist(tmp_path, "jdg_probe_kernels", ["jax_deepgemm/__init__.py",
                                             "jax_deepgemm/_C.cpython-312-x86_64-linux-gnu.so"])
  _fake_dist(tmp_path, "jdg_probe_none", ["jax_deepgemm/__init__.py"])
  monkeypatch.syspath_prepend(str(tmp_path))
  assert _ffi.installed_extension_elsewhere("jdg_probe_kernels") == str(tmp_path / "jax_deepgemm")
  assert _ffi.installed_extension_elsewhere("jdg_probe_none") is None
  assert _ffi.installed_extension_elsewhere("jdg_probe_absent") is None

  monkeypatch.setattr(_ffi, "_C", None)
  monkeypatch.setattr(_ffi, "installed_extension_elsewhere", lambda: "/site/jax_deepgemm")
  monkeypatch.delenv("JAX_DEEPGEMM_FORCE_REFERENCE", raising=False)
  with caplog.at_level(logging.WARNING, logger="jax_deepgemm"):
    assert _ffi.use_kernels.__wrapped__() is False
  assert "/site/jax_deepgemm has one" in caplog.text and "python -P" in caplog.text
