"""gefx.kernels refuses a Triton older than the oldest version it is tested with."""
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_old_triton_is_refused_with_a_reason():
    code = ("import triton; triton.__version__ = '3.5.1'\n"
            "import gefx.kernels as K, gefx.backends as B, torch\n"
            "print(K.UNAVAILABLE); print(len(K.OPS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, n_ops = out.stdout.strip().splitlines()
    assert "triton 3.5.1 is older than 3.6" in reason and "pip install" in reason
    assert n_ops == "0"
