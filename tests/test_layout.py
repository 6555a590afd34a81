"""The repository's top-level `kernels/` folder (installed as gefx.kernels) must not break
transformers when a checkout's root is on sys.path (`python -m pytest`, `python -c` run from it):
transformers imports Hugging Face's own `kernels` package by that name."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_imports_from_a_checkout_root():
    code = ("import transformers.models.gpt2.modeling_gpt2, gefx.kernels, kernels; "
            "print(gefx.kernels.__file__, hasattr(gefx.kernels, 'OPS'), hasattr(kernels, 'OPS'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, has_ops, bare_has_ops = r.stdout.split()
    assert Path(ours).parent == ROOT / "kernels" and has_ops == "True"
    assert bare_has_ops == "False"  # under the bare name: Hugging Face's package (or an empty stand-in)
