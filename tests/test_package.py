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
