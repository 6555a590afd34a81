"""Splitting a kernel's feature (reduction) loop over several programs, and when to do it.

At small B x T the Gram and dense kernels have fewer programs than the GPU has SMs (e.g. ghost_self
at B = 4, T = 512 with 64-token tiles: 144 programs for 132 SMs, each a serial loop over all
Da + Dg features), so most SMs idle or hold a single program. Splitting the loop over the feature
blocks into S chunks, one program each, multiplies the programs by S:

- dense_dot: its epilogue sum(Z * G) is linear in Z = sum_k Z_k, so each chunk's program reduces
  its own partial Z_k against G to one float32 partial; no workspace (split-K).
- ghost_self / ghost_pairwise: sum(Ga * Gg) is bilinear, so each chunk's partial Gram tile (a
  chunk covers Da blocks or Dg blocks, never both) is written to a bounded float32 workspace
  [chunks, tile pairs, BT, BS] by _gram_chunk_kernel (launched once for the activations' chunks,
  once for the gradients': one Gram, one loop, one accumulator per program) and a third kernel
  (_gram_reduce_kernel) sums the Ga and the Gg chunks, each in a fixed order, and forms sum(Ga * Gg).

Deterministic either way: no atomics, every sum in a fixed order.

Cost model (split_count), in units of one feature-block step of one program (loading an x and a
y tile and one tl.dot):

    cost(S) = waves(S) * (ceil(steps / S) + overhead),   waves(S) = ceil(programs * S / slots)

(for the Gram kernels S chunks of the Da + Dg blocks become gram_chunks(S): chunks of Da blocks and
of Dg blocks in proportion, and the formula is taken with those and their longest chunk)

slots = SMs x PROGRAMS_PER_SM programs run at once; overhead = the per-program work beyond the loop
in steps (the epilogue, and for the Gram kernels the workspace round trip: BT x BS x 4 bytes
written and read back, against (BT + BS) x BK x elem bytes loaded per step). S = 1 is the unsplit
kernel (overhead without the workspace). The S with the least cost wins (ties: the smaller S),
subject to: chunks of >= MIN_STEPS steps on average (a pipelined loop needs a few iterations;
chunks of a few hundred features are where a split stops paying for its workspace),
S <= MAX_SPLIT, and the workspace (chunks x programs x bytes per program) <= workspace_bytes()
(GEFX_TRITON_WORKSPACE_MB, default 32 MiB) and <= WORKSPACE_INPUT_FRACTION (1/2) of the inputs'
bytes. A grid that fills the slots gains nothing (waves grow with S as fast as the steps shrink),
so only grids under about one wave, or with a costly partial last wave, split. The model ignores
L2 reuse and memory bandwidth: its constants are to be checked against GPU timings, and the host
tuner still picks among block configs, each with its own planned S (logged with the config).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import _gram_acc, _load_mask

# H100 / H200 SXM: the SM count assumed where no CUDA device is queried (interpreter, compile check)
DEFAULT_SMS = 132
# programs resident per SM: the Gram kernels use 128-230 registers per thread with 4-8 warps, so 1-3
# fit in the 64k registers; 2 is the model's round figure (to be checked on a GPU)
PROGRAMS_PER_SM = 2
MIN_STEPS = 8
MAX_SPLIT = 32
# a Gram split's workspace is at most this fraction of its inputs' bytes (and workspace_bytes())
WORKSPACE_INPUT_FRACTION = 0.5
# the chunk kernel's register cap (.maxnreg), the most a thread can have: without an explicit cap,
# triton 3.6's ptxas held it to 80-128 registers with 4-36 B of spills on sm_80 (an occupancy
# heuristic); with it, it takes what the tile needs (compile check: no spills, <= 214 registers)
MAX_REGISTERS = 255


def sm_count(device: torch.device | str | None = None) -> int:
    """SMs of the CUDA device the kernels run on, else GEFX_TRITON_SMS or DEFAULT_SMS."""
    env = os.environ.get("GEFX_TRITON_SMS", "").strip()
    if env:
        return max(1, int(env))
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and not C.interpreting() and torch.cuda.is_available():
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return DEFAULT_SMS


def workspace_bytes() -> int:
    """Bound on a split's float32 workspace (GEFX_TRITON_WORKSPACE_MB, default 32 MiB)."""
    return int(float(os.environ.get("GEFX_TRITON_WORKSPACE_MB", "32")) * 2**20)


def split_cost(n_programs: int, steps_each: int, slots: int, overhead: float) -> float:
    """The cost model above: waves x (steps per program + overhead)."""
    return math.ceil(n_programs / slots) * (steps_each + overhead)


def split_count(programs: int, steps: int, slots: int, overhead: float = 1.0, split_overhead: float = 0.0,
                ws_per_program: int = 0, ws_limit: int | None = None, min_steps: int | None = None,
                chunking=None) -> int:
    """The S (>= 1) that minimises the modelled cost within the limits (module doc).

    programs: the unsplit grid; steps: its feature-block loop length; split_overhead: the extra
    per-program cost of a split (the workspace round trip), ws_per_program its workspace bytes;
    chunking(S) -> (chunks, steps per chunk) (default: S chunks of ceil(steps / S) steps)."""
    min_steps = MIN_STEPS if min_steps is None else min_steps
    ws_limit = workspace_bytes() if ws_limit is None else ws_limit
    chunking = chunking or (lambda n: (n, math.ceil(steps / n)))
    best, best_cost = 1, split_cost(programs, steps, slots, overhead)
    for s in range(2, MAX_SPLIT + 1):
        chunks, each = chunking(s)
        if steps < s * min_steps or chunks * programs * ws_per_program > ws_limit:
            break
        cost = split_cost(programs * chunks, each, slots, overhead + split_overhead)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def gram_chunks(steps_a: int, steps_g: int, split: int) -> tuple[int, int, int, int]:
    """(blocks per A chunk, A chunks, blocks per G chunk, G chunks): a Gram kernel's loops over the
    Da blocks (steps_a) and the Dg blocks (steps_g) in about `split` chunks, shared between the two
    in proportion to their lengths, of equal length within each, none empty and none straddling the
    two: each chunk's program accumulates one Gram only (one [BT, BS] accumulator, like the
    embedding kernels: fewer registers than the unsplit kernel's two)."""
    split = max(split, 2)
    n_a = max(1, min(steps_a, math.floor(split * steps_a / max(1, steps_a + steps_g) + 0.5)))
    n_g = max(1, min(steps_g, split - n_a))
    per_a, per_g = max(1, triton.cdiv(steps_a, n_a)), max(1, triton.cdiv(steps_g, n_g))
    return per_a, triton.cdiv(steps_a, per_a), per_g, triton.cdiv(steps_g, per_g)


def gram_split(cfg: dict, items: int, steps_a: int, steps_g: int, elem_bytes: int, device,
               input_bytes: int) -> int:
    """S for a Gram kernel with `items` (sample pair, tile pair) programs over steps_a + steps_g
    feature blocks; a split program's overhead is its workspace round trip (one float32 [BT, BS]
    tile written, then read by the reduce kernel) over the bytes one step loads ([BT + BS, BK]).
    The workspace stays within workspace_bytes() and WORKSPACE_INPUT_FRACTION of the inputs'
    bytes (`input_bytes`), so that the kernels' extra memory stays small next to what the caller
    holds (and next to the torch reference's T x T Grams)."""
    bt, bs, bk = cfg["BLOCK_T"], cfg.get("BLOCK_S", cfg["BLOCK_T"]), cfg["BLOCK_K"]
    ws_tile = bt * bs * 4
    ws_limit = min(workspace_bytes(), int(input_bytes * WORKSPACE_INPUT_FRACTION))

    def chunking(n):
        per_a, ca, per_g, cg = gram_chunks(steps_a, steps_g, n)
        return ca + cg, max(per_a, per_g)

    return split_count(items, steps_a + steps_g, sm_count(device) * PROGRAMS_PER_SM, 1.0,
                       2 * ws_tile / ((bt + bs) * bk * elem_bytes), ws_per_program=ws_tile, ws_limit=ws_limit,
                       chunking=chunking)


# ---------------------------------------------------------------------------------------------
# device side


@triton.jit
def _gram_chunk_kernel(
    x1_ptr, x2_ptr, m1_ptr, m2_ptr, ws_ptr, pair_ptr,
    T1, T2, D, n_s, n_tiles, per, chunk0, n_items,
    stride_x1b, stride_x1t, stride_x1d, stride_x2b, stride_x2t, stride_x2d,
    stride_m1b, stride_m1t, stride_m2b, stride_m2t,
    HAS_M1: tl.constexpr, HAS_M2: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial Gram tile x1_i[t tile] . x2_j[s tile] over the chunk k of the D features (`per`
    blocks), written to ws[chunk0 + k, item] (item = (i, j, tile pair)); grid (n_tiles x chunks, B1,
    B2). SYMMETRIC (ghost_self): j = i, B2 = 1, the tile pairs (p, q), q >= p, from the table at
    pair_ptr, the tile of an off-diagonal pair doubled (it stands for its mirror too; exact) when
    chunk0 == 0, i.e. on the activation Gram only. Else (ghost_pairwise) tile pair = (pid // n_s,
    pid % n_s). One Gram, one loop, one accumulator: as light as the embedding kernels."""
    pid = tl.program_id(0) % n_tiles
    k = tl.program_id(0) // n_tiles
    i = tl.program_id(1).to(tl.int64)
    if SYMMETRIC:
        j = i
        p = tl.load(pair_ptr + 2 * pid)
        q = tl.load(pair_ptr + 2 * pid + 1)
    else:
        j = tl.program_id(2).to(tl.int64)
        p = pid // n_s
        q = pid % n_s
    offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = q * BLOCK_S + tl.arange(0, BLOCK_S)
    ok_t = _load_mask(m1_ptr + i * stride_m1b, stride_m1t, offs_t, offs_t < T1, HAS_M1)
    ok_s = _load_mask(m2_ptr + j * stride_m2b, stride_m2t, offs_s, offs_s < T2, HAS_M2)
    live = (tl.sum(ok_t.to(tl.int32), axis=0) > 0) & (tl.sum(ok_s.to(tl.int32), axis=0) > 0)
    lo = k * per * BLOCK_K
    hi = tl.where(live, tl.minimum(lo + per * BLOCK_K, D), lo)  # dead tile pair: no iteration
    acc = _gram_acc(tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32),
                    x1_ptr + i * stride_x1b, stride_x1t, stride_x1d, offs_t, ok_t,
                    x2_ptr + j * stride_x2b, stride_x2t, stride_x2d, offs_s, ok_s, lo, hi, D,
                    BLOCK_K, UPCAST, PRECISION)
    if SYMMETRIC:
        acc = acc * tl.where((p == q) | (chunk0 > 0), 1.0, 2.0)
    item = (i * tl.num_programs(2) + tl.program_id(2)) * n_tiles + pid
    base = ws_ptr + ((chunk0 + k).to(tl.int64) * n_items + item) * (BLOCK_T * BLOCK_S)
    tl.store(base + tl.arange(0, BLOCK_T)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :], acc)


def gram_chunk_launch(ws, chunk0: int, n_chunks: int, per: int, x1, x2, mask1, mask2, pairs, n_s: int,
                      n_tiles: int, cfg: dict, upcast: bool, precision: str) -> None:
    """Fill ws[chunk0 : chunk0 + n_chunks] with the chunks' partial Grams of x1 against x2 (one
    Gram: the activations' or the gradients'); pairs: ghost_self's tile-pair table (symmetric, x1 is
    x2), else None (ghost_pairwise)."""
    if n_chunks == 0:  # no features on this side
        return
    b1, t1, d = x1.shape
    b2, t2 = x2.shape[:2]
    m1, sm1b, sm1t, has1 = C.mask_args(mask1, x1)
    m2, sm2b, sm2t, has2 = C.mask_args(mask2, x2)
    sym = pairs is not None
    _gram_chunk_kernel[(n_tiles * n_chunks, b1, 1 if sym else b2)](
        x1, x2, m1, m2, ws, pairs if sym else ws,
        t1, t2, d, n_s, n_tiles, per, chunk0, ws.shape[1],
        *x1.stride(), *x2.stride(), sm1b, sm1t, sm2b, sm2t,
        HAS_M1=has1, HAS_M2=has2, SYMMETRIC=sym,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_S=cfg.get("BLOCK_S", cfg["BLOCK_T"]), BLOCK_K=cfg["BLOCK_K"],
        UPCAST=upcast, PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        maxnreg=MAX_REGISTERS,
    )


@triton.jit
def _gram_reduce_kernel(ws_ptr, part_ptr, n_items, n_ca, n_chunks,
                        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, ROWS: tl.constexpr):
    """part[item] = sum(Ga * Gg), Ga = sum of chunks 0..n_ca-1, Gg = of chunks n_ca..n_chunks-1,
    each summed in that fixed order, ROWS rows at a time (two [ROWS, BLOCK_S] accumulators)."""
    item = tl.program_id(0).to(tl.int64)
    tile = BLOCK_T * BLOCK_S
    total = 0.0
    for r0 in range(0, BLOCK_T, ROWS):
        offs = (r0 + tl.arange(0, ROWS))[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
        acc_a = tl.zeros((ROWS, BLOCK_S), dtype=tl.float32)
        acc_g = tl.zeros((ROWS, BLOCK_S), dtype=tl.float32)
        for k in range(0, n_ca):
            acc_a += tl.load(ws_ptr + (k * n_items + item) * tile + offs)
        for k in range(n_ca, n_chunks):
            acc_g += tl.load(ws_ptr + (k * n_items + item) * tile + offs)
        total += tl.sum(tl.sum(acc_a * acc_g, axis=1), axis=0)
    tl.store(part_ptr + item, total)


def gram_workspace(n_chunks: int, n_items: int, block_t: int, block_s: int, device) -> torch.Tensor:
    return torch.empty((n_chunks, n_items, block_t, block_s), dtype=torch.float32, device=device)


def gram_reduce(ws: torch.Tensor, n_ca: int) -> torch.Tensor:
    """float32 [n_items]: each item's sum(Ga * Gg) from the chunks' partial Grams in ws (the first
    n_ca chunks hold Ga's, the others Gg's)."""
    n_chunks, n_items, bt, bs = ws.shape
    part = torch.empty((n_items,), dtype=torch.float32, device=ws.device)
    rows = min(bt, max(1, 1024 // bs))
    _gram_reduce_kernel[(n_items,)](ws, part, n_items, n_ca, n_chunks, BLOCK_T=bt, BLOCK_S=bs, ROWS=rows,
                                    num_warps=4, num_stages=2)
    return part
