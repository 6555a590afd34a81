// AMX Gram blocks for ghost_pairwise (ghost.cpp): float32 products on the bfloat16 tile units of
// Sapphire Rapids and later x86 CPUs, to float32 accuracy.
//
// The math. Every float32 x splits exactly into three bfloat16 parts, x = x0 + x1 + x2: x0 keeps the
// top 8 significant bits (a truncation), x1 the next 8 bits of x - x0, x2 the last 8 of what remains
// (24 = float32's significand; exact barring underflow below ~1e-33). A product x y is then
//     x0 y0 + x0 y1 + x1 y0 + x0 y2 + x1 y1 + x2 y0   (+ x1 y2 + x2 y1 + x2 y2, below 2^-24 x y: dropped)
// and every bf16 x bf16 product is exact in the tiles' float32 accumulators. Six tile products per
// pair of 32-feature steps: on the VM of bench/RESULTS.md about 1.3 T bf16 multiply-adds per second
// per core from cache, ~1.7x the core's float32 FMA peak after the factor 6. Accuracy: float32's; a
// Gram entry accumulates sequentially (as a plain float32 loop, six terms per feature), and on the
// offset-data ghost sums of tests/test_cext.py its error is 1.3-2.2x the BLAS kernel's, within the
// range of torch's own float32 result. Values below ~1e-33 in magnitude lose parts (the tile unit
// treats bf16 subnormals as zero).
//
// Tiles: C (16 x 16 float32) += A (16 rows x 32 bf16) B (32 bf16 x 16 columns, stored as 16 rows of
// 16 column pairs: "VNNI"): C[m][n] += sum_p A[m][2p] B[p][n][0] + A[m][2p + 1] B[p][n][1]. Which
// features share a pair slot p is free as long as both sides agree: here features j and j + 16 of a
// 32-feature step, so that both sides' parts come from two float32 vectors by in-lane bit operations
// (split_pairs: no conversion, no word shuffles). A 32 x 32 block of a Gram X Y^T lives in tiles 0-3,
// its two 16-row tiles of X in 4-5, two 16-column tiles of Y^T in 6-7; one 32-feature step is 24
// tile products (six part pairs x four C tiles) with 16 tile loads. X rows are packed per block of
// rows as [step][row tile][part][16 x 32] (0.11-0.15 ns per float from L2); Y rows per 16 columns
// and step by two 16 x 16 float transposes, then split_pairs, into [column tile][step][part][16 x 32]
// (0.22-0.24 ns per float).
//
// Packing costs about as much as the tile products at the block sizes the memory cap of ghost.cpp
// allows (it reads the rows from L3 or DRAM: ~0.5 ns a float at 4096 features).
// It overlaps with the tile products only when interleaved at the granularity of four of them
// (measured: done between 32-feature steps, the two add up): the packer below packs the next 32-row
// stage (and the next chunk of columns) in small units between each group of four, and prefetches
// into L2 the rows of the stage after that and the columns of the chunk after next.
#pragma once

#include <cstdint>
#include <cstring>

#include "micro.h"

#if GEFX_MICRO_AVX512 && !defined(GEFX_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)) && defined(__linux__)
#define GEFX_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GEFX_AMX 0
#endif

namespace gefx {
namespace cpu {

// Whether this CPU and OS run AMX bf16 tiles (and AVX-512 bf16), asking Linux for the process's
// permission to use the tile state once (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16).
inline bool amx_available() {
#if GEFX_AMX
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), tbf16 = d & (1u << 22), avx512bw = b & (1u << 30), avx512f = b & (1u << 16);
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool vbf16 = a & (1u << 5);
    if (!(tile && tbf16 && avx512bw && avx512f && vbf16)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#if GEFX_AMX

#define GEFX_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

constexpr int64_t kAmxStep = 32;    // features per tile product
constexpr int64_t kAmxTile = 512;   // bf16 elements per packed tile (1 KiB)
constexpr int64_t kAmxBlock = 32;   // rows (and columns) of the 2 x 2 register block of C tiles

// While alive, this thread's tile registers are configured: eight 16 x 64-byte tiles.
struct AmxTiles {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };
  GEFX_AMX_TARGET AmxTiles() {
    Config cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) {
      cfg.rows[i] = 16;
      cfg.colsb[i] = 64;
    }
    // GCC 12 drops the stores above otherwise (it cannot see that ldtilecfg reads them).
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  GEFX_AMX_TARGET ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// The three bf16 parts of two float32 vectors, as 16 dword pairs each: pair j = (part of lo[j],
// part of hi[j]) (lo in the low word: the even element of a tile row or VNNI pair). Truncations and
// exact differences: x0 = top 16 bits of x, x1 = top 16 bits of x - x0, x2 = x - x0 - x1 (at most 8
// significant bits: its low 16 bits are zero).
GEFX_AMX_TARGET inline __m512 keep_top16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(int(0xFFFF0000u))));
}
GEFX_AMX_TARGET inline __m512i top16_pairs(__m512 l, __m512 h) {  // (h's top word << 16) | l's top word
  return _mm512_or_si512(_mm512_castps_si512(h), _mm512_maskz_srli_epi32(0xFFFF, _mm512_castps_si512(l), 16));
}
GEFX_AMX_TARGET inline void split_pairs(__m512 lo, __m512 hi, __m512i* p0, __m512i* p1, __m512i* p2) {
  const __m512 l0 = keep_top16(lo), h0 = keep_top16(hi);
  const __m512 lr = _mm512_sub_ps(lo, l0), hr = _mm512_sub_ps(hi, h0);  // exact
  const __m512 l1 = keep_top16(lr), h1 = keep_top16(hr);
  *p0 = top16_pairs(l0, h0);  // (h0, h1 and the last parts have zero low words)
  *p1 = top16_pairs(l1, h1);
  *p2 = top16_pairs(_mm512_sub_ps(lr, l1), _mm512_sub_ps(hr, h1));  // exact, bf16-representable
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] = row i): dword, qword and
// 128-bit-lane interleaves. (Masked forms with a defined pass-through, all lanes set: GCC 12 warns
// about the undefined one of the unmasked intrinsics.)
GEFX_AMX_TARGET inline void transpose16(__m512i r[16]) {
  const __mmask16 all16 = 0xFFFF;
  const __mmask8 all8 = 0xFF;
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_mask_unpacklo_epi32(r[2 * i], all16, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_mask_unpackhi_epi32(r[2 * i], all16, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_mask_unpacklo_epi64(t[4 * i], all8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_mask_unpackhi_epi64(t[4 * i], all8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_mask_unpacklo_epi64(t[4 * i + 1], all8, t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_mask_unpackhi_epi64(t[4 * i + 1], all8, t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_mask_shuffle_i32x4(r[8 * i + j], all16, r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_mask_shuffle_i32x4(r[8 * i + j], all16, r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[8 + j], 0xDD);
  }
}

// The B operand of amx_gram: nc columns of D features, given either as rows (rows[c][k], unit
// feature stride: ghost_pairwise's set 2, transposed while packed) or feature-major (m[k * ld + c]
// for the first `valid` columns, zero beyond: dense_dot's M[:, column block], packed in place).
struct AmxCols {
  const float* const* rows = nullptr;
  const float* m = nullptr;
  int64_t ld = 0, valid = 0;
};

// Packing jobs, done in small units between tile-product groups. A job: the 32 rows x (features
// [k0, k0 + kn)) of a row block into A tiles, one row per unit; B job: nc rows of the column block,
// the same features, into VNNI tiles, in units of 4 rows split (into tmp) or one part transposed.
struct AmxPacker {
  const float* const* x = nullptr;
  uint16_t* ap = nullptr;
  int64_t k0 = 0, kn = 0, ns = 0;
  int ra = kAmxBlock;  // next row of the A job (kAmxBlock: none pending)
  const float* const* px = nullptr;  // the rows (and features) the A job after this one packs: prefetched
  int64_t pk0 = 0, pkn = 0;
  AmxCols y;
  uint16_t* bp = nullptr;
  int64_t yk0 = 0, ykn = 0, yns = 0, nbu = 0, ub = 0;  // B job: units done ub of nbu
  alignas(64) float tmp[2][16][16];

  // B units per (column tile, step): rows: 2 transposes, 4 x 4 VNNI rows; feature-major: 4 x 4 rows
  int units() const { return y.rows ? 6 : 4; }

  void start_a(const float* const* rows, int64_t f0, int64_t nf, uint16_t* dst) {
    x = rows, k0 = f0, kn = nf, ns = divup(nf, kAmxStep), ap = dst, ra = 0;
    px = nullptr;
  }
  void prefetch_next(const float* const* rows, int64_t f0, int64_t nf) { px = rows, pk0 = f0, pkn = nf; }
  int64_t ypn = 0;  // features of the B job after this one (from yk0 + ykn on): prefetched
  void start_b(const AmxCols& cols, int64_t ncols, int64_t f0, int64_t nf, uint16_t* dst, int64_t next_nf = 0) {
    y = cols, yk0 = f0, ykn = nf, yns = divup(nf, kAmxStep), bp = dst, ub = 0, ypn = next_nf;
    nbu = units() * (ncols / 16) * yns;
  }

  // A tile row r of each step: features (j, j + 16) as pair j, for j < 16 (the B tiles pair them
  // alike; any pairing works as long as both sides share it).
  GEFX_AMX_TARGET void a_row(int r) {
    if (px)
      for (int64_t f = 0; f < pkn; f += 16) _mm_prefetch(reinterpret_cast<const char*>(px[r] + pk0 + f), _MM_HINT_T1);
    const float* xr = x[r] + k0;
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n = kn - s * kAmxStep;
      __m512i p0, p1, p2;
      split_pairs(_mm512_maskz_loadu_ps(lane_mask(n), xr + s * kAmxStep),
                  _mm512_maskz_loadu_ps(lane_mask(n - 16), xr + s * kAmxStep + 16), &p0, &p1, &p2);
      uint16_t* d = ap + ((s * 2 + r / 16) * 3) * kAmxTile + (r % 16) * 32;
      _mm512_store_si512(d, p0);
      _mm512_store_si512(d + kAmxTile, p1);
      _mm512_store_si512(d + 2 * kAmxTile, p2);
    }
  }
  // B tiles of (column tile t, step s) in units(): from rows, 0 and 1 load the 16 columns' features
  // 0-15, 16-31 and transpose them (tmp[0], tmp[1]: row p = feature p (+ 16) of the 16 columns),
  // 2-5 make VNNI rows 4 (v - 2) .. 4 (v - 2) + 3 of the three part tiles: row p = pairs (feature
  // p, p + 16); feature-major, unit v makes VNNI rows 4 v .. 4 v + 3 straight from rows of m.
  GEFX_AMX_TARGET void b_unit(int64_t u) {
    const int64_t w = u / units(), v = u % units(), t = w / yns, s = w % yns;
    uint16_t* d = bp + (t * yns + s) * 3 * kAmxTile;
    if (!y.rows) {
      const __mmask16 cm = lane_mask(y.valid - 16 * t);
      const int64_t n = ykn - s * kAmxStep;  // features left in this step
      const float* mk = y.m + (yk0 + s * kAmxStep) * y.ld + 16 * t;
      if (s == 0)  // the next chunk's rows of this column tile, a quarter per unit
        for (int64_t j = v; j < ypn; j += 4) _mm_prefetch(reinterpret_cast<const char*>(mk + (ykn + j) * y.ld), _MM_HINT_T1);
      for (int p = 4 * int(v); p < 4 * int(v) + 4; ++p) {
        const __m512 lo = _mm512_maskz_loadu_ps(p < n ? cm : __mmask16(0), mk + p * y.ld);
        const __m512 hi = _mm512_maskz_loadu_ps(p + 16 < n ? cm : __mmask16(0), mk + (p + 16) * y.ld);
        __m512i p0, p1, p2;
        split_pairs(lo, hi, &p0, &p1, &p2);
        _mm512_store_si512(d + p * 32, p0);
        _mm512_store_si512(d + kAmxTile + p * 32, p1);
        _mm512_store_si512(d + 2 * kAmxTile + p * 32, p2);
      }
      return;
    }
    if (v < 2) {
      const int64_t n = ykn - s * kAmxStep - 16 * v;
      const __mmask16 m = lane_mask(n);
      __m512i r[16];
      for (int c = 0; c < 16; ++c) {
        const float* yc = y.rows[t * 16 + c] + yk0;
        if (s == 0 && v == 0)
          for (int64_t f = 0; f < ypn; f += 16) _mm_prefetch(reinterpret_cast<const char*>(yc + ykn + f), _MM_HINT_T1);
        r[c] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, yc + s * kAmxStep + 16 * v));
      }
      transpose16(r);
      for (int p = 0; p < 16; ++p) _mm512_store_si512(tmp[v][p], r[p]);
      return;
    }
    for (int p = 4 * int(v - 2); p < 4 * int(v - 2) + 4; ++p) {
      __m512i p0, p1, p2;
      split_pairs(_mm512_load_ps(tmp[0][p]), _mm512_load_ps(tmp[1][p]), &p0, &p1, &p2);
      _mm512_store_si512(d + p * 32, p0);
      _mm512_store_si512(d + kAmxTile + p * 32, p1);
      _mm512_store_si512(d + 2 * kAmxTile + p * 32, p2);
    }
  }
  GEFX_AMX_TARGET inline void work(int na, int nb) {
    for (int i = 0; i < na && ra < kAmxBlock; ++i) a_row(ra++);
    for (int i = 0; i < nb && ub < nbu; ++i) b_unit(ub++);
  }
  GEFX_AMX_TARGET void finish_a() {
    while (ra < kAmxBlock) a_row(ra++);
  }
  GEFX_AMX_TARGET void finish_b() {
    while (ub < nbu) b_unit(ub++);
  }
};

#define GEFX_AMX_TDP4            \
  _tile_dpbf16ps(0, 4, 6);       \
  _tile_dpbf16ps(1, 4, 7);       \
  _tile_dpbf16ps(2, 5, 6);       \
  _tile_dpbf16ps(3, 5, 7);

// One 32-feature step of a 32 x 32 block: a0, a1 the two row tiles' parts, b0, b1 the two column
// tiles'; the packer works between the six groups of four tile products.
GEFX_AMX_TARGET inline void amx_step(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1,
                                     AmxPacker& pk, int na, int nb) {
  constexpr int64_t T = kAmxTile;
  _tile_loadd(4, a0, 64); _tile_loadd(5, a1, 64); _tile_loadd(6, b0, 64); _tile_loadd(7, b1, 64);
  GEFX_AMX_TDP4  // x0 y0
  pk.work(na, nb);
  _tile_loadd(6, b0 + T, 64); _tile_loadd(7, b1 + T, 64);
  GEFX_AMX_TDP4  // x0 y1
  pk.work(na, nb);
  _tile_loadd(4, a0 + T, 64); _tile_loadd(5, a1 + T, 64);
  GEFX_AMX_TDP4  // x1 y1
  pk.work(na, nb);
  _tile_loadd(6, b0, 64); _tile_loadd(7, b1, 64);
  GEFX_AMX_TDP4  // x1 y0
  pk.work(na, nb);
  _tile_loadd(4, a0 + 2 * T, 64); _tile_loadd(5, a1 + 2 * T, 64);
  GEFX_AMX_TDP4  // x2 y0
  pk.work(na, nb);
  _tile_loadd(4, a0, 64); _tile_loadd(5, a1, 64); _tile_loadd(6, b0 + 2 * T, 64); _tile_loadd(7, b1 + 2 * T, 64);
  GEFX_AMX_TDP4  // x0 y2
  pk.work(na, nb);
}
#undef GEFX_AMX_TDP4

// bf16 elements of one packing buffer: A (a 32-row block) and B (nc columns) for kc features.
inline int64_t amx_a_elems(int64_t kc) { return kAmxBlock * divup(kc, kAmxStep) * kAmxStep * 3; }
inline int64_t amx_b_elems(int64_t nc, int64_t kc) { return nc * divup(kc, kAmxStep) * kAmxStep * 3; }

// A thread's scratch for amx_gram work items: `floats` floats (the callers' Gram blocks) followed by
// the two A and two B packing buffers for nc columns and chunks of kc features, one allocation.
struct AmxScratch {
  Scratch<float> buf;
  float* floats;
  uint16_t* ab[2];
  uint16_t* bb[2];
  static int64_t pack_bytes(int64_t nc, int64_t kc) { return 2 * 2 * (amx_a_elems(kc) + amx_b_elems(nc, kc)); }
  AmxScratch(int64_t nfloats, int64_t nc, int64_t kc) {
    const int64_t na = amx_a_elems(kc), nb = amx_b_elems(nc, kc);  // multiples of 32: 64-byte aligned
    floats = buf.get(nfloats + na + nb);
    uint16_t* p = reinterpret_cast<uint16_t*>(floats + nfloats);
    ab[0] = p, ab[1] = p + na, bb[0] = p + 2 * na, bb[1] = p + 2 * na + nb;
  }
};

// Work-item blocks for amx_gram over n1 rows x n2 columns (multiples of 32): the powers of two rc <=
// max_rows, nc <= max_cols and kc in {128, 64, 32} with the cheapest packing (rows are packed once
// per column block, columns once per row block: cost per float ~ 1 / nc + wcol / rc; chunks of 32
// features ~12% dearer in tile reloads and short packing units) such that cell_bytes rc nc bytes of
// Gram blocks plus the packs fit `budget` bytes and >= min_items items remain where the sizes allow.
// From the shapes only (never the thread count).
inline void amx_blocks(int64_t n1, int64_t n2, int64_t max_rows, int64_t max_cols, int64_t cell_bytes, double wcol,
                       int64_t budget, int64_t min_items, int64_t* rc, int64_t* nc, int64_t* kc) {
  const int64_t max_items = divup(n1, kAmxBlock) * divup(n2, kAmxBlock);
  double best = -1;
  *rc = *nc = *kc = kAmxBlock;
  for (int64_t k : {int64_t(128), int64_t(64), int64_t(32)})
    for (int64_t r = kAmxBlock; r <= std::min(max_rows, n1); r *= 2)
      for (int64_t c = kAmxBlock; c <= std::min(max_cols, n2); c *= 2) {
        if (cell_bytes * r * c + AmxScratch::pack_bytes(c, k) > budget) continue;
        if (divup(n1, r) * divup(n2, c) < std::min(min_items, max_items)) continue;
        const double score = (k == 32 ? 0.88 : 1.0) / (wcol / r + 1.0 / c);
        if (score > best) best = score, *rc = r, *nc = c, *kc = k;
      }
}

// C[q, c] (row-major, ld floats) = x_q . y_c over the features [0, D) for q < nr, c < nc (both
// multiples of 32), with the features in chunks of kc (a multiple of 32). Stages: (chunk, 32-row
// block); while a stage's tile products run, the packer fills the other buffer of ab with the next
// stage's rows and, over a chunk's stages, the other buffer of bb with the next chunk's columns.
// The tile registers must be configured (AmxTiles).
GEFX_AMX_TARGET inline void amx_gram(const float* const* x, const AmxCols& y, int64_t nr, int64_t nc, int64_t D,
                                     int64_t kc, float* C, int64_t ld, uint16_t* const ab[2], uint16_t* const bb[2]) {
  const int64_t nk = divup(D, kc), nq = nr / kAmxBlock;
  AmxPacker pk;
  auto chunk = [&](int64_t k) { return std::min(kc, D - k * kc); };
  pk.start_b(y, nc, 0, chunk(0), bb[0]);
  pk.finish_b();
  pk.start_a(x, 0, chunk(0), ab[0]);
  pk.finish_a();
  int64_t stage = 0;
  for (int64_t k = 0; k < nk; ++k) {
    const int64_t ns = divup(chunk(k), kAmxStep);
    const uint16_t* bp = bb[k % 2];
    for (int64_t q = 0; q < nq; ++q, ++stage) {
      const uint16_t* ap = ab[stage % 2];
      if (q + 1 < nq) {
        pk.start_a(x + (q + 1) * kAmxBlock, k * kc, chunk(k), ab[(stage + 1) % 2]);
      } else if (k + 1 < nk) {
        pk.start_a(x, (k + 1) * kc, chunk(k + 1), ab[(stage + 1) % 2]);
      }
      // and the rows of the stage after that, into L2
      if (q + 2 < nq) {
        pk.prefetch_next(x + (q + 2) * kAmxBlock, k * kc, chunk(k));
      } else if (k + 1 < nk) {
        pk.prefetch_next(x + (q + 2 - nq) * kAmxBlock, (k + 1) * kc, chunk(k + 1));
      }
      if (q == 0 && k + 1 < nk)
        pk.start_b(y, nc, (k + 1) * kc, chunk(k + 1), bb[(k + 1) % 2], k + 2 < nk ? chunk(k + 2) : 0);
      // units per group of four tile products: this stage's A job over its groups, the rest of the
      // B job over the chunk's remaining stages
      const int64_t groups = 6 * (nc / kAmxBlock) * ns;
      const int na = int(divup(kAmxBlock, groups));
      const int nb = int(divup(pk.nbu - pk.ub, (nq - q) * groups));
      for (int64_t j = 0; j < nc; j += kAmxBlock) {
        float* cb = C + q * kAmxBlock * ld + j;
        if (k == 0) {
          _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        } else {
          _tile_loadd(0, cb, ld * 4); _tile_loadd(1, cb + 16, ld * 4);
          _tile_loadd(2, cb + 16 * ld, ld * 4); _tile_loadd(3, cb + 16 * ld + 16, ld * 4);
        }
        for (int64_t s = 0; s < ns; ++s) {
          const uint16_t* a0 = ap + s * 2 * 3 * kAmxTile;
          const uint16_t* b0 = bp + ((j / 16) * ns + s) * 3 * kAmxTile;
          amx_step(a0, a0 + 3 * kAmxTile, b0, b0 + ns * 3 * kAmxTile, pk, na, nb);
        }
        _tile_stored(0, cb, ld * 4); _tile_stored(1, cb + 16, ld * 4);
        _tile_stored(2, cb + 16 * ld, ld * 4); _tile_stored(3, cb + 16 * ld + 16, ld * 4);
      }
      pk.finish_a();
    }
    pk.finish_b();
  }
}

#endif  // GEFX_AMX

}  // namespace cpu
}  // namespace gefx
