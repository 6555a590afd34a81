"""Shared pieces of the Triton kernels: input checks, the tile Gram helper, block choice, tuning.

Every launcher returns ``NotImplemented`` for inputs its kernel does not run (float64, CPU tensors
outside the interpreter) so that gefx.backends falls back to the torch reference, and raises a
clear error for inputs that are wrong everywhere (non-float activations, mismatched shapes or
devices). Nothing here queries a device at import time.

Partial sums: each program writes one float32 partial (a tile pair, a token tile) into a buffer
that the host sums in a fixed order, so results are deterministic (no atomics).

Tuning: block sizes decide the grid and the partial buffer, so they are tuned on the host: the
first call for a (op, shapes, dtypes, device) key times each candidate config with CUDA events and
keeps the fastest (``GEFX_TRITON_AUTOTUNE=0`` keeps the first candidate). Under the interpreter
only the first candidate runs, with blocks shrunk to the problem. Each pick is recorded once per key
in ``PICKS`` and, with ``GEFX_TRITON_TUNE_LOG=path`` (or ``=1`` for stderr), logged as a JSON line.
The pick itself (``pick`` / ``choose``) takes the timer as an argument, so it is tested on the CPU.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def runs_here(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: CUDA tensors, or CPU ones under the interpreter."""
    devs = {t.device.type for t in tensors if t is not None}
    if interpreting():
        return devs <= {"cpu", "cuda"}
    return devs == {"cuda"}


def check_float(name: str, x: torch.Tensor) -> bool:
    """Raise for non-tensors and non-float tensors; False (-> fallback) for float64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {x.dtype}")
    return x.dtype in FLOAT_DTYPES


def check_3d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, D], got shape {tuple(x.shape)}")


def check_ids(name: str, ids: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64/int32 tensor of token ids [B, T]")
    if ids.dim() != 2 or tuple(ids.shape) != tuple(like.shape[:2]):
        raise ValueError(f"{name} {tuple(ids.shape)} must be [B, T] = {tuple(like.shape[:2])} of {like_name}")


def check_mask(name: str, mask: torch.Tensor | None, like: torch.Tensor, like_name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [B, T] or None, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"{name} {tuple(mask.shape)} must be [B, T] = {tuple(like.shape[:2])} of {like_name}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all inputs must be on one device: {desc}")


def check_same(what: str, x: int, y: int) -> None:
    if x != y:
        raise ValueError(f"{what} differ: {x} vs {y}")


def mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """(pointer tensor, stride_b, stride_t, HAS_MASK) for a bool mask (read as uint8 bytes)."""
    if mask is None:
        return like, 0, 0, False
    m = mask.view(torch.uint8) if mask.element_size() == 1 else mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def fp32_precision() -> str:
    """How float32 (and upcast mixed-dtype) tiles are multiplied: "tf32x3" (default; tensor cores at
    float32 accuracy, see _dot) or "ieee" (CUDA-core FMAs, e.g. to compare speed or accuracy), read
    from GEFX_TRITON_FP32_DOT at each launch."""
    mode = os.environ.get("GEFX_TRITON_FP32_DOT", "tf32x3").strip().lower()
    if mode not in ("tf32x3", "ieee"):
        raise ValueError(f"GEFX_TRITON_FP32_DOT must be 'tf32x3' or 'ieee', got {mode!r}")
    return mode


def dot_precision(dtype: torch.dtype) -> str:
    """_dot's PRECISION: "tf32x3" for float32 inputs (float32 accuracy, matching torch's default of
    no TF32, on tensor cores), the native tensor-core path ("tf32", ignored for 16-bit inputs) for
    fp16/bf16, whose products are exact in the fp32 accumulator."""
    return fp32_precision() if dtype == torch.float32 else "tf32"


def pair_mode(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for a dot of tiles of x and y: upcast to fp32 when their dtypes differ
    (then multiplied like float32 inputs)."""
    if x.dtype == y.dtype:
        return False, dot_precision(x.dtype)
    return True, fp32_precision()


def wide(*precisions: str) -> bool:
    """Whether any dot runs on float32 operands (tf32x3 or ieee rather than the native 16-bit
    path): such tiles need about three times the registers, hence the modules' CONFIGS_FP32."""
    return any(p != "tf32" for p in precisions)


def pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block size >= floor (tl.dot needs 16), <= cap, not much larger than n."""
    return max(floor, min(cap, triton.next_power_of_2(max(1, n))))


# ---------------------------------------------------------------------------------------------
# host-side tuner


_TUNED: dict[tuple, dict] = {}


def fit_configs(configs: Sequence[dict], elem_bytes: int = 4, **sizes) -> list[dict]:
    """Candidate configs with each named block shrunk to its problem size (a power of two, see
    pow2_block), deduplicated in order; one config only under the interpreter. A size is an int or
    (int, floor). On a CUDA device, configs whose shared memory (smem_estimate at `elem_bytes` per
    input element; 4 = float32, the worst case) exceeds the device's limit are dropped."""
    out = []
    for cfg in configs[:1] if interpreting() else configs:
        c = dict(cfg)
        for block, size in sizes.items():
            n, floor = size if isinstance(size, tuple) else (size, 16)
            c[block] = pow2_block(n, cfg[block], floor=floor)
        if c not in out:
            out.append(c)
    return prune_configs(out, device_target(), elem_bytes)


# Shared memory per block (bytes, the opt-in maximum) by compute capability major*10+minor.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def smem_estimate(cfg: dict, elem_bytes: int = 4, target: int | None = None) -> int:
    """Upper bound on a config's shared memory (bytes), from how the kernels load tiles: a tl.dot
    loop loads a [rows, BLOCK_K] and a [BLOCK_K, cols] tile per stage (rows = BLOCK_M / BLOCK_T,
    cols = BLOCK_N / BLOCK_S, or BLOCK_T for the square self kernels) into the shared buffers of
    Triton's software pipeline (sequential loops reuse them): num_stages - 1 buffers on sm_8x
    (cp.async), num_stages on sm_90+ (TMA/wgmma pipelines) and when the target is unknown. The
    dot-free kernels ([BLOCK_T, BLOCK_D] tiles of two inputs) are bounded by 2 such tiles a buffer."""
    rows = cfg.get("BLOCK_M", cfg.get("BLOCK_T", 0))
    if "BLOCK_K" in cfg:
        cols = cfg.get("BLOCK_N", cfg.get("BLOCK_S", rows))
        per_stage = (rows + cols) * cfg["BLOCK_K"]
    else:
        per_stage = 2 * rows * cfg.get("BLOCK_D", 0)
    stages = cfg.get("num_stages", 2)
    buffers = stages if target is None or target >= 90 else max(1, stages - 1)
    return buffers * per_stage * elem_bytes + SMEM_SCRATCH


# Scratch beyond the pipeline buffers: layout conversions of the accumulators and the epilogue
# (measured on the full compile grid: up to 4 KiB for the Gram kernels' float32 64 x 64 tiles and
# 12 KiB for dense_dot's float32 64 x 128 tile with 8 warps on sm_90), rounded up.
SMEM_SCRATCH = 16384


def prune_configs(configs: Sequence[dict], target: int | None, elem_bytes: int = 4,
                  limit: int | None = None) -> list[dict]:
    """Drop the configs whose smem_estimate exceeds the shared memory of `target` (capability as
    major*10+minor; None: keep all). Never returns an empty list: if none fits, the smallest stays."""
    if target is None and limit is None:
        return list(configs)
    limit = limit if limit is not None else SMEM_LIMIT.get(target, SMEM_LIMIT[80] if target >= 80 else 49152)
    est = lambda c: smem_estimate(c, elem_bytes, target)  # noqa: E731
    keep = [c for c in configs if est(c) <= limit]
    return keep or [min(configs, key=est)][:len(configs)]


_TARGET: list = []


def device_target() -> int | None:
    """Compute capability (major*10+minor) of the current CUDA device when the kernels compile for
    it; None under the interpreter or without CUDA (then nothing is pruned)."""
    if interpreting() or not torch.cuda.is_available():
        return None
    if not _TARGET:
        major, minor = torch.cuda.get_device_capability()
        _TARGET.append(major * 10 + minor)
    return _TARGET[0]


def _time_ms(fn: Callable[[], object], reps: int = 5, long_ms: float = 20.0) -> float:
    """Median time of `fn` in ms after one warm-up call; a single timed run when it is long."""
    fn()  # compile + warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        if times and times[0] > long_ms:
            break
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


# Every pick in this process, one entry per (op, key, device) and config, in order: the benchmark
# reads it to report which config each case ran with. GEFX_TRITON_TUNE_LOG=path appends each entry
# to that file as one JSON line (=1 or =stderr: to stderr).
PICKS: list[dict] = []
_LOGGED: set = set()


def pick(candidates: Sequence[dict], measure: Callable[[dict], float]) -> tuple[dict, list]:
    """(fastest candidate, [(candidate, ms or None)]): measure(candidate) -> ms for each one; a
    candidate whose measurement raises (does not compile or fit) is skipped (ms None)."""
    times = []
    for cand in candidates:
        try:
            ms = float(measure(cand))
        except Exception:  # noqa: BLE001 - a config that does not compile/fit is skipped
            ms = None
        times.append((cand, ms))
    ran = [(ms, n) for n, (_, ms) in enumerate(times) if ms is not None]
    if not ran:
        raise RuntimeError("no candidate config ran")
    return candidates[min(ran)[1]], times  # ties: the earlier candidate


def _log_pick(op: str, key: tuple, device: str, cfg: dict, how: str, times: list) -> None:
    """Record a pick once per (op, key, device, config): in PICKS and in GEFX_TRITON_TUNE_LOG."""
    ident = (op, key, device, tuple(sorted(cfg.items())))
    if ident in _LOGGED:
        return
    _LOGGED.add(ident)
    entry = dict(op=op, key=[str(k) for k in key], device=device, config=dict(cfg), how=how,
                 times_ms=[dict(config=dict(c), ms=ms) for c, ms in times])
    PICKS.append(entry)
    dest = os.environ.get("GEFX_TRITON_TUNE_LOG", "").strip()
    if dest in ("", "0"):
        return
    import json
    import sys
    line = json.dumps(entry, default=str)
    if dest.lower() in ("1", "stderr"):
        print(f"gefx.kernels tune: {line}", file=sys.stderr, flush=True)
    else:
        with open(dest, "a") as f:
            f.write(line + "\n")


def choose(op: str, key: tuple, device: str, candidates: Sequence[dict],
           measure: Callable[[dict], float] | None) -> dict:
    """The config to run for `key`: with `measure` (ms of one candidate), the fastest candidate,
    timed once per (op, key, device) and cached; without, the first candidate (not cached, so that a
    change of the candidate list takes effect). Each pick is logged once (_log_pick)."""
    full = (op, key, device)
    if full in _TUNED:
        return _TUNED[full]
    if measure is None or len(candidates) == 1:
        cfg, how, times = candidates[0], "first" if len(candidates) > 1 else "only", []
    else:
        try:
            cfg, times = pick(candidates, measure)
        except RuntimeError:
            raise RuntimeError(f"gefx.kernels.{op}: no candidate config ran for key {key}") from None
        how = "timed"
        _TUNED[full] = cfg
    _log_pick(op, key, device, cfg, how, times)
    return cfg


def tuned(op: str, key: tuple, candidates: Sequence[dict], launch: Callable[[dict], torch.Tensor],
          device: torch.device) -> torch.Tensor:
    """Run `launch(config)` with the fastest candidate for `key` (timed once per key on CUDA with
    CUDA events; elsewhere, or with GEFX_TRITON_AUTOTUNE=0, the first candidate)."""
    timed = not interpreting() and device.type == "cuda" and os.environ.get("GEFX_TRITON_AUTOTUNE", "1") != "0"
    measure = (lambda cand: _time_ms(lambda: launch(cand))) if timed else None
    return launch(choose(op, key, str(device), candidates, measure))


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _split_tf32(x):
    """(hi, lo) with x ~= hi + lo, both exactly representable in tf32 (1 + 10 mantissa bits).

    hi is x rounded to nearest (ties away from zero, as cvt.rna.tf32.f32) on its 10 top mantissa
    bits: adding half a tf32 ulp (bit 12) to the bit pattern and clearing the 13 low bits rounds the
    magnitude (a carry into the exponent is the correct rounding). x - hi is exact in fp32 and at
    most half a tf32 ulp of x (2^-11 |x|), and rounding it the same way leaves x - hi - lo at most
    2^-23 |x|. Rounding (rather than truncating) both parts matters: truncation makes hi - x and
    the dropped lo * lo terms one-signed (a bias) and leaves lo to the tensor core's own truncation;
    measured on randn * 10**U(-3, 3) data, the mean error vs torch's float32 matmul was 1.0-1.4x
    with rounding and 1.6-4.5x with truncation. Since hi and lo are exact tf32 values, the GPU's
    tf32 products equal the interpreter's float32 ones (11 x 11 bit products are exact in fp32).
    Inf / NaN inputs give NaN (inf - inf); finite |x| > 3.4e38 * (1 - 2^-12) rounds hi to inf.
    """
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000
    r = x - hi
    lo = ((r.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _dot(x, y, acc, PRECISION: tl.constexpr):
    """acc + x @ y in float32: the one place where the kernels call tl.dot.

    PRECISION "tf32x3" (float32 and upcast mixed-dtype tiles): the 3xTF32 scheme on tensor cores,
    x_hi y_hi + x_hi y_lo + x_lo y_hi with fp32 accumulation (x_lo y_lo, <= 2^-22 |x||y| and of
    random sign, is dropped), small terms first. It is spelled out rather than left to tl.dot's
    built-in input_precision="tf32x3" (same split, cvt.rna rounding) because the Triton CPU
    interpreter ignores input_precision: only an explicit split lets the CPU tests check the
    decomposition (exactness of the parts, the three products, the accumulation). "ieee" (CUDA-core
    fp32 FMAs, spill-heavy in the Gram kernels) and the native 16-bit path ("tf32" on fp16/bf16
    tiles) go straight to tl.dot.
    """
    if PRECISION == "tf32x3":
        x_hi, x_lo = _split_tf32(x)
        y_hi, y_lo = _split_tf32(y)
        acc = tl.dot(x_lo, y_hi, acc, input_precision="tf32")
        acc = tl.dot(x_hi, y_lo, acc, input_precision="tf32")
        acc = tl.dot(x_hi, y_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gram_tile(x_ptr, stride_xt, stride_xd, offs_t, ok_t,
               y_ptr, stride_yt, stride_yd, offs_s, ok_s, D,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_T, BLOCK_S] float32 tile of token dot products x_t . y_s over D features.

    x_ptr / y_ptr point at one sample's [T, D] slab; rows with ok_t / ok_s False load as zeros.
    Offsets are int64: token x row stride reaches 2^31 at T = 128k, D = 16k, and feature x feature
    stride does the same for feature-major ([B, D, T] transposed) views.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    y_cols = y_ptr + offs_s.to(tl.int64)[None, :] * stride_yt
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        ok_k = kk < D
        kk64 = kk.to(tl.int64)
        x = tl.load(x_rows + kk64[None, :] * stride_xd, mask=ok_t[:, None] & ok_k[None, :], other=0.0)
        y = tl.load(y_cols + kk64[:, None] * stride_yd, mask=ok_k[:, None] & ok_s[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = _dot(x, y, acc, PRECISION)
    return acc


@triton.jit
def _gram_acc(acc, x_ptr, stride_xt, stride_xd, offs_t, ok_t,
              y_ptr, stride_yt, stride_yd, offs_s, ok_s, K_LO, K_HI, D,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + the token dot products x_t . y_s over the features [K_LO, min(K_HI, D)) only (K_LO a
    multiple of BLOCK_K; an empty range adds nothing): one chunk of a feature loop split over
    programs (see _split.py). The pointers move to K_LO and the loop starts at 0, as _gram_tile's
    (a loop from a runtime start cost registers: spills in the compile check). int64 offsets."""
    n = tl.minimum(K_HI, D) - K_LO
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + K_LO.to(tl.int64) * stride_xd
    y_cols = y_ptr + offs_s.to(tl.int64)[None, :] * stride_yt + K_LO.to(tl.int64) * stride_yd
    for k0 in range(0, n, BLOCK_K):
        kk = k0 + offs_k
        ok_k = kk < n
        kk64 = kk.to(tl.int64)
        x = tl.load(x_rows + kk64[None, :] * stride_xd, mask=ok_t[:, None] & ok_k[None, :], other=0.0)
        y = tl.load(y_cols + kk64[:, None] * stride_yd, mask=ok_k[:, None] & ok_s[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = _dot(x, y, acc, PRECISION)
    return acc


@triton.jit
def _load_mask(m_ptr, stride_mt, offs, ok, HAS_MASK: tl.constexpr):
    """Token mask of one sample's tile as int1 (bounds included)."""
    live = ok
    if HAS_MASK:
        m = tl.load(m_ptr + offs.to(tl.int64) * stride_mt, mask=ok, other=0)
        live = ok & (m != 0)
    return live


def check_id_range(name: str, ids: torch.Tensor, rows: int) -> None:
    """Token ids must index a table of `rows` rows (one device sync; out-of-range reads are unsafe)."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= rows:
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside a table of {rows} rows")
