"""Every Triton kernel compiles clean for A100 (sm_80) and H100 (sm_90), without a GPU.

gefx.kernels.compile_check derives each kernel's signature from its launcher (meta tensors, launch
intercepted) and compiles it with triton.compile for the target; the cases run in worker processes
with TRITON_INTERPRET=0 (this process interprets the kernels, see conftest.py).

The representative grid (each kernel x {fp32, bf16, one mixed} x its first config x {sm_80, sm_90},
plus an int64-id + masked case, plus dense_dot's known over-limit config) always runs; the full grid
(every dtype, id dtype, mask and config, ~10 minutes on 2 cores) is marked compile_grid and deselected by
default: `pytest -m compile_grid tests/test_compile.py` (or `python -m gefx.kernels.compile_check --full`).
"""
from __future__ import annotations

import pytest

from gefx.kernels import _common as C
from gefx.kernels import compile_check as cc

_WHY = cc.available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cannot compile CUDA kernels here: {_WHY}")

# dense_dot's 128x128x64 config with 4 stages: 3 x 64 KiB of float32 tiles = 192 KiB > 163 KiB on sm_80
DENSE_BIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)

# fp32 (and mixed, upcast to fp32) dots run as three tf32 dots per tile (kernels/_common._dot): with
# the 16-bit configs they spilled on sm_80 (up to 12 KB per thread for dense_dot), so each module
# has CONFIGS_FP32, sized not to spill on either target; every fp32 case must compile spill-free.


def _rep_cases():
    out = cc.cases(full=False)
    for target in cc.TARGETS:
        out.append(cc.Case("dense_dot", ("fp32",) * 3, tuple(sorted(DENSE_BIG.items())), target))
    return out


REP = _rep_cases()
_RECORDS: dict[str, dict] = {}


def _records(cases) -> dict:
    todo = [c for c in cases if c.label not in _RECORDS]
    if todo:
        for c, r in zip(todo, cc.run_cases(todo)):
            _RECORDS[c.label] = r
    return {c.label: _RECORDS[c.label] for c in cases}


@pytest.fixture(scope="module")
def rep():
    return _records(REP)


def _low_precision(case) -> bool:
    return all(d in ("fp16", "bf16") for d in case.dtypes)


def _check(case, r):
    assert r.error is None, f"{case.label}: {r.error}"
    assert r.registers is not None and r.registers <= 255, f"{case.label}: {r.registers} registers"
    # the estimate used for pruning is an upper bound on what Triton allocates
    assert r.shared <= r.shared_estimate, f"{case.label}: shared {r.shared} > estimate {r.shared_estimate}"
    elem = max(C.dtype_bytes(cc.DTYPES[d]) for d in case.dtypes)
    kept = C.smem_estimate(case.cfg, elem, case.target) <= r.shared_limit
    if kept:
        assert r.shared <= r.shared_limit, f"{case.label}: shared {r.shared} > limit {r.shared_limit}"
    if r.expects_tensor_cores:
        assert r.tensor_cores != "no", f"{case.label}: fp16/bf16 tl.dot did not lower to mma/wgmma"
    if _low_precision(case):
        assert not r.spill_stores and not r.spill_loads, \
            f"{case.label}: {r.spill_stores} B spill stores / {r.spill_loads} B spill loads per thread"


@pytest.mark.parametrize("case", REP, ids=lambda c: c.label)
def test_compiles(rep, case):
    r = rep[case.label]
    print(f"{case.label}: regs={r.registers} spills={r.spill_stores}/{r.spill_loads} shared={r.shared} "
          f"tc={r.tensor_cores} {r.compile_s:.1f}s")
    _check(case, r)


_FP32 = [c for c in REP if "fp32" in c.dtypes and c.cfg == cc._configs(c.kernel, fp32=True)[0]]


@pytest.mark.parametrize("case", _FP32, ids=lambda c: c.label)
def test_fp32_no_spills(rep, case):
    r = rep[case.label]
    assert r.error is None, r.error
    assert not r.spill_stores and not r.spill_loads, \
        f"{case.label}: {r.spill_stores} B spill stores / {r.spill_loads} B spill loads per thread"


def test_known_over_limit_config(rep):
    """dense_dot fp32 128x128x64 s4: 3 x 64 KiB = 192 KiB on sm_80 (> 163 KiB), 4 x 64 KiB = 256 KiB
    on sm_90 (> 227 KiB): pruned on both; the estimate is exact here."""
    for target in (80, 90):
        case = cc.Case("dense_dot", ("fp32",) * 3, tuple(sorted(DENSE_BIG.items())), target)
        r = rep[case.label]
        assert r.error is None, r.error
        assert r.shared == C.smem_estimate(DENSE_BIG, 4, target) - C.SMEM_SCRATCH
        assert r.shared > r.shared_limit
        assert C.prune_configs([DENSE_BIG, dict(DENSE_BIG, num_stages=2)], target, 4) == [dict(DENSE_BIG, num_stages=2)]


def test_prune_configs():
    from gefx.kernels import dense_dot
    cfgs = list(dense_dot.CONFIGS)
    assert C.prune_configs(cfgs, None) == cfgs
    assert C.prune_configs(cfgs, 80, 4) == [c for c in cfgs if c != DENSE_BIG]
    assert C.prune_configs(cfgs, 80, 2) == cfgs
    assert C.prune_configs(cfgs, 90, 2) == cfgs
    # never empty: the smallest config stays
    assert C.prune_configs(cfgs, 80, 4, limit=1) == [min(cfgs, key=lambda c: C.smem_estimate(c, 4, 80))]
    # exactly the configs over the limit go, for every module, target and element size
    for kernel in cc.KERNELS:
        configs = cc._configs(kernel)
        for target in (80, 86, 90):
            for elem in (2, 4):
                keep = C.prune_configs(configs, target, elem)
                fits = [c for c in configs if C.smem_estimate(c, elem, target) <= C.SMEM_LIMIT[target]]
                assert keep == fits or (not fits and len(keep) == 1)


def test_fit_configs_unpruned_without_device():
    # under the interpreter / on the CPU nothing is pruned (device_target() is None)
    assert C.device_target() is None
    from gefx.kernels import dense_dot
    for fp32, configs in ((False, dense_dot.CONFIGS), (True, dense_dot.CONFIGS_FP32)):
        assert dense_dot.fit_configs(1 << 12, 1 << 12, 1 << 12, fp32=fp32) == (
            list(configs[:1]) if C.interpreting() else list(configs))


# ---------------------------------------------------------------------------------------------
# full grid


FULL = cc.cases(full=True)


@pytest.fixture(scope="module")
def full():
    return _records(FULL)


@pytest.mark.compile_grid
@pytest.mark.parametrize("case", FULL, ids=lambda c: c.label)
def test_full_grid(full, case):
    r = full[case.label]
    _check(case, r)
    # pruning removes exactly the configs whose compiled shared memory exceeds the target's limit
    elem = max(C.dtype_bytes(cc.DTYPES[d]) for d in case.dtypes)
    pruned = C.smem_estimate(case.cfg, elem, case.target) > r.shared_limit
    assert pruned == (r.shared > r.shared_limit), \
        f"{case.label}: shared {r.shared}, estimate {r.shared_estimate}, limit {r.shared_limit}"


def test_split_variants_in_both_grids():
    """The split feature loops (cfg SPLIT > 1) and the Gram kernels' reduce kernel (launch 1) are
    compiled in the representative grid (first config, fp32 and bf16) and in the full grid (every
    config), the Gram kernels with both chunk-kernel launches (activations, gradients)."""
    for grid in (REP, FULL):
        for kernel, launches in cc.SPLIT_LAUNCHES.items():
            split = [c for c in grid if c.kernel == kernel and c.cfg.get("SPLIT", 1) > 1]
            assert {d[0] for c in split for d in [c.dtypes]} >= {"fp32", "bf16"}, kernel
            assert {c.launch for c in split} == set(range(launches)), kernel
    full_cfgs = {(c.kernel, c.dtypes, tuple(sorted((k, v) for k, v in c.cfg.items() if k != "SPLIT")))
                 for c in FULL if c.kernel in cc.SPLIT_LAUNCHES and c.launch == 0}
    split_cfgs = {(c.kernel, c.dtypes, tuple(sorted((k, v) for k, v in c.cfg.items() if k != "SPLIT")))
                  for c in FULL if c.kernel in cc.SPLIT_LAUNCHES and c.cfg.get("SPLIT", 1) > 1}
    assert full_cfgs == split_cfgs
