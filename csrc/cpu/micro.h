// The AVX-512 float32 micro kernel shared by dense_dot (dense.cpp) and ghost_pairwise (ghost.cpp),
// with its packing routines. Compiled for AVX-512 through target attributes (the rest of the
// extension stays generic); micro_available() says at run time whether this CPU can run it.
//
// A micro-tile: MR = 6 rows x NR = 64 columns of C = X P, in 24 zmm accumulators, where the rows
// of X are read in place (one broadcast scalar per row and reduction step, any row addresses) and
// P is a packed chunk [reduction steps, 64] (contiguous, 64-byte aligned). With 4 vector loads and
// 6 broadcasts per 24 FMAs it runs at ~85-90% of the core's FMA peak from cache. The reduction is
// cut in chunks; the accumulators are carried between chunks in y and, after the last chunk, each
// row is dotted with a row of Z: out[r] += C[r, :] . Z[r, :]. Both uses are sums of such dots:
//   dense_dot      C = g M[:, panel]   (X = g rows, P = M's rows, a copy),  Z = a rows
//   ghost_pairwise C = g1 G2[panel]^T  (X = g1 rows, P = G2 rows transposed), Z = the a-Gram tile
//                  A1 A2[panel]^T, itself a micro-tile product carried in y.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
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

#if GEFX_MICRO_AVX512

inline __mmask16 lane_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
}

// One micro-tile over reduction steps [o0, o0 + no): C[r] (+)= sum_o x[r][o0 + o] P[o, :], starting
// from zero (first) or y[r * 64 ..]; then C goes to y (!last) or, after the last chunk, out[r] +=
// C[r, 0:nz] . z[r][0:nz] (lanes past nz masked off; one horizontal sum per row, fixed order).
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

// P[o * 64 + j] = M[o * ldm + j] for o < no, j < nk, zero for j >= nk (a chunk of rows, copied).
__attribute__((target("avx512f"))) inline void pack_rows(const float* M, int64_t ldm, int64_t no, int64_t nk,
                                                         float* P) {
  __mmask16 m[kNV];
  for (int v = 0; v < kNV; ++v) m[v] = lane_mask(nk - 16 * v);
  for (int64_t o = 0; o < no; ++o, M += ldm, P += kNR)
    _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)
      _mm512_store_ps(P + 16 * v, _mm512_maskz_loadu_ps(m[v], M + 16 * v));
}

// In-register transpose of a 16 x 16 block: v[i] = row i in, column i out.
__attribute__((target("avx512f"))) inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r0[4L], r1[4L], r0[4L+1], r1[4L+1]) / the next two
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  __m512 u[4][4];  // u[q][c], lane L: rows 4q..4q+3 at column 4L + c
  for (int q = 0; q < 4; ++q) {
    u[q][0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[q][1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
    u[q][2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[q][3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes: column 4L + c = lane L of u[0..3][c]
    const __m512 x0 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x44), x1 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x44), x3 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xEE);
    v[c] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    v[4 + c] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    v[8 + c] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
}

// P[k * 64 + s] = rows[s][k0 + k] for k < kc, s < ns (<= 64), zero for s >= ns: a chunk of up to 64
// rows, transposed in 16 x 16 blocks.
__attribute__((target("avx512f"))) inline void pack_transposed(const float* const* rows, int64_t ns, int64_t k0,
                                                               int64_t kc, float* P) {
  for (int64_t s0 = 0; s0 < kNR; s0 += 16) {
    for (int64_t kb = 0; kb < kc; kb += 16) {
      const __mmask16 m = lane_mask(kc - kb);
      __m512 v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = s0 + i < ns ? _mm512_maskz_loadu_ps(m, rows[s0 + i] + k0 + kb) : _mm512_setzero_ps();
      transpose16(v);
      const int64_t nk = std::min<int64_t>(16, kc - kb);
      for (int64_t i = 0; i < nk; ++i) _mm512_store_ps(P + (kb + i) * kNR + s0, v[i]);
    }
  }
}

#endif  // GEFX_MICRO_AVX512

}  // namespace cpu
}  // namespace gefx
