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
only the first candidate runs, with blocks shrunk to the problem.
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


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for float32 inputs (matching torch's default of
    no TF32), the native tensor-core path for fp16/bf16 (whose products are exact in fp32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pair_mode(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for a dot of tiles of x and y: upcast to fp32 when their dtypes differ."""
    if x.dtype == y.dtype:
        return False, dot_precision(x.dtype)
    return True, "ieee"


def pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block size >= floor (tl.dot needs 16), <= cap, not much larger than n."""
    return max(floor, min(cap, triton.next_power_of_2(max(1, n))))


# ---------------------------------------------------------------------------------------------
# host-side tuner


_TUNED: dict[tuple, dict] = {}


def fit_configs(configs: Sequence[dict], **sizes) -> list[dict]:
    """Candidate configs with each named block shrunk to its problem size (a power of two, see
    pow2_block), deduplicated in order; one config only under the interpreter. A size is an int or
    (int, floor)."""
    out = []
    for cfg in configs[:1] if interpreting() else configs:
        c = dict(cfg)
        for block, size in sizes.items():
            n, floor = size if isinstance(size, tuple) else (size, 16)
            c[block] = pow2_block(n, cfg[block], floor=floor)
        if c not in out:
            out.append(c)
    return out


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


def tuned(op: str, key: tuple, candidates: Sequence[dict], launch: Callable[[dict], torch.Tensor],
          device: torch.device) -> torch.Tensor:
    """Run `launch(config)` with the fastest candidate for `key` (timed once per key on CUDA)."""
    if interpreting() or device.type != "cuda" or len(candidates) == 1 \
            or os.environ.get("GEFX_TRITON_AUTOTUNE", "1") == "0":
        return launch(candidates[0])
    full = (op, key, str(device))
    cfg = _TUNED.get(full)
    if cfg is None:
        best = None
        for cand in candidates:
            try:
                ms = _time_ms(lambda: launch(cand))
            except Exception:  # noqa: BLE001 - a config that does not compile/fit is skipped
                continue
            if best is None or ms < best[0]:
                best = (ms, cand)
        if best is None:
            raise RuntimeError(f"gefx.kernels.{op}: no candidate config ran for key {key}")
        cfg = _TUNED[full] = best[1]
    return launch(cfg)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _gram_tile(x_ptr, stride_xt, stride_xd, offs_t, ok_t,
               y_ptr, stride_yt, stride_yd, offs_s, ok_s, D,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_T, BLOCK_S] float32 tile of token dot products x_t . y_s over D features.

    x_ptr / y_ptr point at one sample's [T, D] slab; rows with ok_t / ok_s False load as zeros.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t[:, None] * stride_xt
    y_cols = y_ptr + offs_s[None, :] * stride_yt
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        ok_k = kk < D
        x = tl.load(x_rows + kk[None, :] * stride_xd, mask=ok_t[:, None] & ok_k[None, :], other=0.0)
        y = tl.load(y_cols + kk[:, None] * stride_yd, mask=ok_k[:, None] & ok_s[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_mask(m_ptr, stride_mt, offs, ok, HAS_MASK: tl.constexpr):
    """Token mask of one sample's tile as int1 (bounds included)."""
    live = ok
    if HAS_MASK:
        m = tl.load(m_ptr + offs * stride_mt, mask=ok, other=0)
        live = ok & (m != 0)
    return live


def check_id_range(name: str, ids: torch.Tensor, rows: int) -> None:
    """Token ids must index a table of `rows` rows (one device sync; out-of-range reads are unsafe)."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= rows:
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside a table of {rows} rows")
