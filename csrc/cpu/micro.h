// The AVX-512 float32 micro kernels: dense_dot's (dense.cpp) with its packing routine, and the
// dot-form Gram tile of ghost_pairwise (ghost.cpp). Compiled for AVX-512 through target attributes
// (the rest of the extension stays generic); micro_available() says at run time whether this CPU can
// run them (-DGEFX_NO_MICRO builds without them, to test that path).
//
// dense_dot's micro-tile: MR = 6 rows x NR = 64 columns of C = X P, in 24 zmm accumulators, where the rows of
// X are read in place (one broadcast scalar per row and reduction step, any row addresses) and P is
// a packed panel [reduction steps, 64] (contiguous, 64-byte aligned). With 4 vector loads and 6
// broadcasts per 24 FMAs it runs at ~85-90% of the core's FMA peak from cache (bench: 180-205
// GFLOP/s against a 225-230 GFLOP/s FMA loop on the 2-core AVX-512 VM of bench/RESULTS.md). A long
// reduction is cut in chunks, the accumulators carried between them in y; after the last chunk each
// row is dotted with a row of Z: out[r] += C[r, :] . Z[r, :]. For dense_dot,
// X = g rows, P = M[:, 64 in-features] (a copy of M's rows), Z = the a rows' same 64 features.
#pragma once

#include <cstdint>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(GEFX_NO_MICRO)
#include <immintrin.h>
#define GEFX_MICRO_AVX512 1
#else
#define GEFX_MICRO_AVX512 0
#endif

namespace gefx {
namespace cpu {

constexpr int kMR = 6;   // micro-tile rows (measured fastest of 12x32, 8x48, 6x64, 14x32 here; 6 rows
                         // also keep few X rows, often 4 KiB apart, in one L1 set)
constexpr int kNV = 4;   // 16-float vectors per micro-tile row
constexpr int kNR = 64;  // micro-tile columns = packed chunk width

inline bool micro_available() {
#if GEFX_MICRO_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// Whether a micro kernel can read a pair of factors a, g: float32 (accumulated in float32), unit
// feature stride, an AVX-512 CPU.
inline bool micro_eligible(const View3& a, const View3& g, at::ScalarType acc) {
  return micro_available() && acc == at::kFloat && a.dtype == at::kFloat && g.dtype == at::kFloat &&
         (a.sd == 1 || a.D == 1) && (g.sd == 1 || g.D == 1);
}

#if GEFX_MICRO_AVX512

inline __mmask16 lane_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
}

// One micro-tile over reduction steps [o0, o0 + no): C[r] (+)= sum_o x[r][o0 + o] P[o, :], starting
// from zero (first) or from y[r * 64 ..]; then C goes to y (!last) or, after the last chunk,
// out[r] += C[r, 0:nz] . z[r][0:nz] (lanes past nz masked off; one horizontal sum per row, in a fixed
// order).
__attribute__((target("avx512f"))) inline void micro_tile(const float* const* x, const float* const* z,
                                                          float* const* out, const float* P, int64_t o0, int64_t no,
                                                          int64_t nz, float* y, bool first, bool last) {
  __m512 c[kMR][kNV];
  _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)
    c[r][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(y + r * kNR + 16 * v);
  const float* xr[kMR];
  _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) xr[r] = x[r] + o0;
  _Pragma("GCC unroll 4") for (int64_t o = 0; o < no; ++o, P += kNR) {
    __m512 b[kNV];
    _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v) b[v] = _mm512_load_ps(P + 16 * v);
    _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) {
      const __m512 s = _mm512_set1_ps(xr[r][o]);
      _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v) c[r][v] = _mm512_fmadd_ps(s, b[v], c[r][v]);
    }
  }
  if (!last) {
    _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)
      _mm512_store_ps(y + r * kNR + 16 * v, c[r][v]);
    return;
  }
  __mmask16 m[kNV];
  _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v) m[v] = lane_mask(nz - 16 * v);
  _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) {
    __m512 t = _mm512_mul_ps(c[r][0], _mm512_maskz_loadu_ps(m[0], z[r]));
    _Pragma("GCC unroll 4") for (int v = 1; v < kNV; ++v)
      t = _mm512_fmadd_ps(c[r][v], _mm512_maskz_loadu_ps(m[v], z[r] + 16 * v), t);
    alignas(64) float s[16];  // horizontal sum, pairwise in a fixed order
    _mm512_store_ps(s, t);
    for (int h = 8; h >= 1; h /= 2)
      for (int j = 0; j < h; ++j) s[j] += s[j + h];
    *out[r] += s[0];
  }
}

// ---- the dot-form micro kernel of ghost_pairwise (ghost.cpp): a Gram tile from rows read in place.
// out[r * ldo + c] += x_r[k0 : k0 + n] . y_c[k0 : k0 + n] for kGR = 6 rows x and kGC = 4 rows y: 24 zmm
// accumulators along the features, 10 vector loads per 24 FMAs, no packing and no scratch; lanes past
// n are masked off, each row's four accumulators are summed horizontally at the end (hsum4, a fixed
// order). From L1 it runs at ~185 GFLOP/s per core at n = 1024 on the VM of bench/RESULTS.md, from
// L2 at ~150-165; the horizontal sums cost more at short n (ghost.cpp uses it from 512 features).
constexpr int kGR = 6, kGC = 4;

// The horizontal sums of four vectors [sum x0, sum x1, sum x2, sum x3] in 11 shuffles and adds (a
// fixed order): within each 128-bit lane, halves of pairs, then of the pair sums; then the lanes.
__attribute__((target("avx512f"))) inline __m128 hsum4(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  // per lane: [x0 01+23 halves, x1 ...] then [x0, x1, x2, x3]
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_ps(x0, x1, 0x44), _mm512_shuffle_ps(x0, x1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_ps(x2, x3, 0x44), _mm512_shuffle_ps(x2, x3, 0xEE));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x88), _mm512_shuffle_ps(s01, s23, 0xDD));
  // lanes: (0+2) + (1+3). Masked forms with defined sources: GCC 12 warns about the undefined
  // pass-through of the unmasked ones.
  const __mmask16 all = 0xFFFF;
  const __m512 w2 = _mm512_add_ps(w, _mm512_mask_shuffle_f32x4(w, all, w, w, 0x4E));
  const __m512 w4 = _mm512_add_ps(w2, _mm512_mask_shuffle_f32x4(w2, all, w2, w2, 0xB1));
  return _mm512_maskz_extractf32x4_ps(0xF, w4, 0);
}

__attribute__((target("avx512f"))) inline void gram_tile(const float* const* x, const float* const* y, int64_t k0,
                                                         int64_t n, float* out, int64_t ldo) {
  __m512 c[kGR][kGC];
  _Pragma("GCC unroll 8") for (int r = 0; r < kGR; ++r) _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j)
    c[r][j] = _mm512_setzero_ps();
  const float* xr[kGR];
  const float* yc[kGC];
  _Pragma("GCC unroll 8") for (int r = 0; r < kGR; ++r) xr[r] = x[r] + k0;
  _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j) yc[j] = y[j] + k0;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512 b[kGC];
    _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j) b[j] = _mm512_loadu_ps(yc[j] + k);
    _Pragma("GCC unroll 8") for (int r = 0; r < kGR; ++r) {
      const __m512 v = _mm512_loadu_ps(xr[r] + k);
      _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j) c[r][j] = _mm512_fmadd_ps(v, b[j], c[r][j]);
    }
  }
  if (k < n) {
    const __mmask16 m = lane_mask(n - k);
    __m512 b[kGC];
    _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j) b[j] = _mm512_maskz_loadu_ps(m, yc[j] + k);
    _Pragma("GCC unroll 8") for (int r = 0; r < kGR; ++r) {
      const __m512 v = _mm512_maskz_loadu_ps(m, xr[r] + k);
      _Pragma("GCC unroll 4") for (int j = 0; j < kGC; ++j) c[r][j] = _mm512_fmadd_ps(v, b[j], c[r][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < kGR; ++r) {
    const __m128 h = hsum4(c[r][0], c[r][1], c[r][2], c[r][3]);
    _mm_storeu_ps(out + r * ldo, _mm_add_ps(_mm_loadu_ps(out + r * ldo), h));
  }
}

// P[o * 64 + j] = M[o * ldm + j] for o < no, j < nk, zero for j >= nk (a chunk of rows, copied).
__attribute__((target("avx512f"))) inline void pack_rows(const float* M, int64_t ldm, int64_t no, int64_t nk,
                                                         float* P) {
  __mmask16 m[kNV];
  for (int v = 0; v < kNV; ++v) m[v] = lane_mask(nk - 16 * v);
  for (int64_t o = 0; o < no; ++o, M += ldm, P += kNR)
    _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)
      _mm512_store_ps(P + 16 * v, _mm512_maskz_loadu_ps(m[v], M + 16 * v));
}

#endif  // GEFX_MICRO_AVX512

}  // namespace cpu
}  // namespace gefx
