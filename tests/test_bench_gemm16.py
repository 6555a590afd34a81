"""bench/cpu_gemm16.py (16-bit CPU matrix products through float32, for the memory benchmark):
its products are the float64 product rounded once to the 16-bit dtype, up to float32 accumulation,
chunked or not, through autograd too. Run in a subprocess: install() overrides aten kernels for the
whole process."""
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import cpu_gemm16
torch.manual_seed(0)
cases = [((37, 64), (64, 29)), ((5, 300), (300, 7))]
cpu_gemm16.install()
for budget in (1 << 23, 100):  # one chunk, and chunks of rows and columns
    cpu_gemm16._BUDGET = budget
    for dt in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dt).eps
        for sa, sb in cases:
            a, b = torch.randn(sa).to(dt), torch.randn(sb).to(dt)
            exact = a.double() @ b.double()
            scale = a.double().abs() @ b.double().abs()
            for got in (a @ b, a.t().contiguous().t() @ b, torch.mm(a, b.t().contiguous().t())):
                assert got.dtype == dt and got.shape == exact.shape
                err = (got.double() - exact).abs()
                # one rounding to dt (half an ulp of the result) plus float32 accumulation
                assert (err <= exact.abs() * eps / 2 + scale * 1e-6).all(), (dt, budget, err.max())
            c = torch.randn(sb[1]).to(dt)
            got = torch.addmm(c, a, b, beta=0.5, alpha=2.0)
            ref = 0.5 * c.double() + 2.0 * exact
            assert ((got.double() - ref).abs() <= ref.abs() * eps + 2 * scale * 1e-6 + 0.5 * c.double().abs() * eps).all()
            A, B = torch.randn(3, *sa).to(dt), torch.randn(3, *sb).to(dt)
            got, ex = torch.bmm(A, B).double(), A.double() @ B.double()
            assert ((got - ex).abs() <= ex.abs() * eps / 2 + (A.double().abs() @ B.double().abs()) * 1e-6).all()
    x = torch.randn(4, 6, 64, dtype=torch.bfloat16, requires_grad=True)
    lin = torch.nn.Linear(64, 48, bias=False).bfloat16()
    lin(x).square().sum().backward()
    xd = x.detach().double().requires_grad_()
    torch.nn.functional.linear(xd, lin.weight.double()).square().sum().backward()
    assert torch.allclose(x.grad.double(), xd.grad, rtol=3e-2, atol=3e-2)
x32 = torch.randn(8, 8)
assert torch.equal(x32 @ x32, torch.ops.aten.mm.out(x32, x32, out=torch.empty(8, 8)))  # float32: torch's own
print("ok")
"""


def test_products_through_float32_are_rounded_once():
    bench = Path(__file__).resolve().parent.parent / "bench"
    got = subprocess.run([sys.executable, "-c", SCRIPT, str(bench)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and got.stdout.strip().endswith("ok"), got.stderr[-3000:]
