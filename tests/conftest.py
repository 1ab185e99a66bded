import os
import zlib
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng(request):
  # Fresh data per test, reproducible per test name.
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
