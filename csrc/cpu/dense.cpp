// dense_dot: v[b] = sum_t g_bt^T M a_bt (the inner product of each sample's weight gradient
// G_b^T A_b with a dense matrix M [out, in], e.g. an aggregated gradient), three exact kernels:
//
//   micro  (float32 a and g with unit feature stride, on a CPU with AVX-512, where its scratch fits
//          the budget; the default there): the register-blocked micro kernel of micro.h. For 6 rows r and 64 in
//          features at a time it forms y_r = g_r^T M[:, 64 features] in 24 vector accumulators (g
//          read in place) and at once adds y_r . a_r to r's partial sum; M is read through a packed
//          panel (Dg x 64) reused by every row. No [rows, features] product exists at all.
//   amx    (the same inputs on a CPU with AMX bf16 tiles, for long products of wide layers; the
//          default there): Z = G[rows] M[:, block] from the AMX Gram blocks of amx.h (float32 to
//          float32 accuracy), each Z row dotted with a at once.
//   blas   (anything else: float64, half inputs, strided features, other CPUs, few rows): 2-D
//          product tiles Z = A[rows] M[o-block]^T from single-threaded BLAS calls, each tile dotted
//          with G at once (the tile is the scratch).
//
// Why several: the reference is one multithreaded GEMM at the machine's peak. BLAS on small,
// memory-capped tiles repacks both operands on every call and runs a few % below it at 1024
// features; the micro kernel packs each panel of M once per row block and reads g and a in place.
// Work items, block sizes and summation orders depend on the shapes only: the result does not
// depend on the number of threads.
#include "../gefx_ops.h"
#include "amx.h"
#include "common.h"
#include "micro.h"

#include <cmath>

namespace gefx {

using namespace cpu;


namespace {

// ------------------------------------------------------------------------------- blas kernel

// Product tile R x O: at most E = min(N Dg / 12, 128 Da) elements (1/12 of the reference's [N, out]
// product; beyond 128 Da a larger tile no longer pays, measured), split as O = the power of two
// nearest below sqrt(E / 2) in [16, kDenseMaxOut] and R = E / O in [16, kDenseMaxRows], each at most
// the problem's extent. E.g. (N, D) = (512, 256): 128 x 64; (512, 1024): 256 x 128; (2048, 1024): 512 x 256.
int64_t pow2floor(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

// A thread's scratch budget in elements: 1/12 of the reference's [N, Dg] product (at least 256); the
// reference holds two such products, so T threads hold at most T/24 of its peak (as the ghost ops).
int64_t dense_budget(int64_t N, int64_t Dg) { return std::max<int64_t>(256, N * Dg / 12); }

void dense_tile(int64_t N, int64_t Da, int64_t Dg, int64_t* R, int64_t* O) {
  const int64_t E = std::min(dense_budget(N, Dg), std::max<int64_t>(256, 128 * Da));
  int64_t o = std::clamp<int64_t>(pow2floor(static_cast<int64_t>(std::sqrt(double(E) / 2))), 16, kDenseMaxOut);
  o = std::min(o, Dg);
  int64_t r = std::clamp<int64_t>(pow2floor(E / std::max<int64_t>(o, 1)), 16, kDenseMaxRows);
  r = std::min(r, N);
  *R = std::max<int64_t>(r, 1);
  *O = std::max<int64_t>(o, 1);
}

// Per-row partial sums part[grp * N + r] (over groups of column blocks) -> v[b], in a fixed order.
template <typename acc_t>
at::Tensor sum_rows(const std::vector<acc_t>& part, int64_t ng, int64_t B, int64_t T) {
  const int64_t N = B * T;
  at::Tensor res = at::empty({B}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
  acc_t* pr = res.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    acc_t s = 0;
    for (int64_t t = 0; t < T; ++t) {
      acc_t x = 0;
      for (int64_t k = 0; k < ng; ++k) x += part[k * N + b * T + t];
      s += x;
    }
    pr[b] = s;
  }
  return res;
}

// The flat rows (N = B T) are cut into row blocks of R rows and the out features into blocks of O
// columns (dense_tile). A work item is one row block and a fixed group of out blocks; for each out
// block it forms the product tile Z = A[rows] M[o0:o0+O, :]^T (R x O, one single-threaded BLAS
// call) and at once adds dot(Z[r], G[r, o0:o0+O]) to row r's partial sum while Z is in cache.
// Per-thread scratch is that tile (plus converted rows for non-float inputs).
template <typename acc_t>
at::Tensor dense_dot_blas(const View3& a, const View3& g, const acc_t* pm, int64_t ldm, const MaskView& mask) {
  const int64_t B = a.B, T = a.T, Da = a.D, Dg = g.D, N = B * T;
  int64_t R = 0, O = 0;
  dense_tile(N, Da, Dg, &R, &O);
  const int64_t nrb = divup(N, R), nob = divup(Dg, O);
  // Out-block groups: enough work items (>= kDenseItems when the blocks allow) for small N.
  const int64_t ng = std::clamp<int64_t>(divup(kDenseItems, nrb), 1, nob);
  std::vector<acc_t> part(ng * N, acc_t(0));
  const bool g_direct = g.dtype == acc_scalar<acc_t>() && g.sd == 1;
  at::parallel_for(0, nrb * ng, 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    SerialBlas serial;
    std::vector<acc_t> ba, w, gbuf(O);
    Scratch<acc_t> sz;
    acc_t* z = sz.get(std::min(R, N) * O);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t rb = item / ng, grp = item % ng, r0 = rb * R, n = std::min(R, N - r0);
      if (row_weights(mask, T, r0, n, w) == 0) continue;
      at::Tensor A = rows_matrix<acc_t>(a, r0, n, 0, Da, ba);
      const acc_t* pa = A.data_ptr<acc_t>();
      const int64_t lda = ld_of(A);
      acc_t* out = part.data() + grp * N + r0;
      for (int64_t ob = grp * nob / ng; ob < (grp + 1) * nob / ng; ++ob) {
        const int64_t o0 = ob * O, no = std::min(O, Dg - o0);
        gemm_nt<acc_t>(n, no, Da, pa, lda, pm + o0 * ldm, ldm, z);
        for (int64_t r = 0; r < n; ++r) {
          if (w[r] == acc_t(0)) continue;
          const int64_t b = (r0 + r) / T, t = (r0 + r) % T;
          const acc_t* gr;
          if (g_direct) {
            gr = static_cast<const acc_t*>(g.ptr) + b * g.sb + t * g.st + o0;
          } else {
            load_row<acc_t>(g, b, t, o0, no, gbuf.data());
            gr = gbuf.data();
          }
          out[r] += dot(z + r * no, gr, no);
        }
      }
    }
  });
  return sum_rows(part, ng, B, T);
}

// ------------------------------------------------------------------------------ micro kernel
#if GEFX_MICRO_AVX512

// v[b] = sum_t y_bt, y_r = sum over the 64-feature panels of the in features of g_r^T M[:, panel] .
// a_r[panel] (micro.h): a panel P = M[:, panel] (Dg x 64) is packed, then every 6-row micro-tile of
// the active rows runs through it (the last tile padded with copies of the last row, results to a
// dummy). Row r's partial sum gets one term per panel, in panel order: the result does not depend
// on the number of threads. Two ways to share the work, by the budget E (dense_budget, micro_layout):
//   own panels     work items = groups of panels x row blocks (<= 512 rows); each thread packs the
//                  panels of its items, out rows in chunks of <= 1024 (256 KiB) with the tiles'
//                  accumulators carried between chunks. No synchronisation.
//   a shared panel (Dg <= 1024, N >= 384 in auto, when a thread's own panel does not fit E): one
//                  panel at a time for all threads; they pack it together (split over out rows),
//                  then split its micro-tiles, a barrier after each.
// Scratch: the panel(s), carried accumulators, the row pointers, the partial sums; no product.
constexpr int64_t kMicroRows = 512;  // own panels: rows per block (a panel is packed once per block)

// The active rows as 6-row micro-tiles, and their partial sums part[group][N].
struct MicroRows {
  std::vector<const float*> g, a;
  std::vector<int64_t> row;  // flat row b T + t of each entry; -1 for the padding of the last tile
  std::vector<float> part;
  int64_t N = 0, ntiles = 0;

  MicroRows(const View3& va, const View3& vg, const MaskView& mask, int64_t groups, int64_t pad = kMR)
      : N(va.B * va.T) {
    part.assign(groups * N, 0.f);
    for (int64_t b = 0; b < va.B; ++b)
      for (int64_t t = 0; t < va.T; ++t)
        if (mask.active(b, t)) {
          g.push_back(static_cast<const float*>(vg.ptr) + b * vg.sb + t * vg.st);
          a.push_back(static_cast<const float*>(va.ptr) + b * va.sb + t * va.st);
          row.push_back(b * va.T + t);
        }
    while (!g.empty() && g.size() % pad != 0) {
      g.push_back(g.back());
      a.push_back(a.back());
      row.push_back(-1);
    }
    ntiles = static_cast<int64_t>(g.size()) / kMR;  // (micro kernel: pad = kMR)
  }

  // Micro-tile i against the chunk P = M[o0 : o0 + no, k : k + nk] of a panel, into group grp's
  // partial sums after the last chunk (Dg = o0 + no); y carries its accumulators between chunks.
  void tile(int64_t i, const float* P, int64_t o0, int64_t no, int64_t Dg, int64_t k, int64_t nk, int64_t grp,
            float* y) {
    const float* z[kMR];
    float* out[kMR];
    float dummy[kMR] = {};
    for (int r = 0; r < kMR; ++r) {
      z[r] = a[i * kMR + r] + k;
      const int64_t q = row[i * kMR + r];
      out[r] = q < 0 ? dummy + r : part.data() + grp * N + q;
    }
    micro_tile(g.data() + i * kMR, z, out, P, o0, no, nk, y, o0 == 0, o0 + no == Dg);
  }
};

// Out rows of M per packed chunk: at most 1024 (256 KiB, half an L2 here); longer reductions carry
// the accumulators between chunks.
constexpr int64_t kMicroOut = 1024;

// Which micro-kernel layout fits the budget E (dense_budget): 1 = own panels (a thread's chunk and
// carried accumulators <= E), 2 = a shared panel (Dg <= kMicroOut; the panel <= 2E), 0 = neither.
int micro_layout(int64_t N, int64_t Dg) {
  const int64_t E = dense_budget(N, Dg), oc = std::min(Dg, kMicroOut);
  const int64_t carried = Dg > oc ? divup(std::min(N, kMicroRows), int64_t(kMR)) * kMR * kNR : 0;
  if (oc * kNR + carried <= E) return 1;
  if (Dg <= kMicroOut && Dg * kNR <= 2 * E) return 2;
  return 0;
}

at::Tensor dense_dot_micro(const View3& a, const View3& g, const float* pm, int64_t ldm, const MaskView& mask) {
  const int64_t B = a.B, T = a.T, Da = a.D, Dg = g.D, N = B * T, npanel = divup(Da, int64_t(kNR));
  const auto pack = [&](int64_t p, int64_t o0, int64_t no, float* dst) {  // M[o0 : o0 + no, panel p]
    pack_rows(pm + o0 * ldm + p * kNR, ldm, no, std::min<int64_t>(kNR, Da - p * kNR), dst);
  };
  if (micro_layout(N, Dg) != 2) {  // own panels (also when forced beyond the budget)
    const int64_t nrb = divup(N, kMicroRows), ng = std::clamp<int64_t>(divup(kDenseItems, nrb), 1, npanel);
    const int64_t OC = std::min(Dg, kMicroOut);
    MicroRows rows(a, g, mask, ng);
    const int64_t per = divup(rows.ntiles, nrb);  // tiles per row block
    at::parallel_for(0, nrb * ng, 1, [&](int64_t lo, int64_t hi) {
      Scratch<float> sp, sy;
      float* P = sp.get(OC * kNR);
      float* y = Dg > OC ? sy.get(per * kMR * kNR) : nullptr;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t rb = item / ng, grp = item % ng, i0 = rb * per, i1 = std::min(rows.ntiles, i0 + per);
        for (int64_t p = grp * npanel / ng; p < (grp + 1) * npanel / ng; ++p)
          for (int64_t o0 = 0; o0 < Dg; o0 += OC) {
            const int64_t no = std::min(OC, Dg - o0);
            pack(p, o0, no, P);
            for (int64_t i = i0; i < i1; ++i)
              rows.tile(i, P, o0, no, Dg, p * kNR, std::min<int64_t>(kNR, Da - p * kNR), grp,
                        y == nullptr ? nullptr : y + (i - i0) * kMR * kNR);
          }
      }
    });
    return sum_rows(rows.part, ng, B, T);
  }
  MicroRows rows(a, g, mask, 1);  // a shared panel
  Scratch<float> sp;
  float* P = sp.get(Dg * kNR);
  // Threads: torch's setting, one inside an enclosing parallel region, at most one per 8 tiles.
  const int nth = at::in_parallel_region() ? 1
                                           : static_cast<int>(std::clamp<int64_t>(rows.ntiles / 8, 1,
                                                                                  at::get_num_threads()));
#pragma omp parallel num_threads(nth)
  for (int64_t p = 0; p < npanel; ++p) {
#pragma omp for schedule(static)
    for (int64_t o0 = 0; o0 < Dg; o0 += 64) pack(p, o0, std::min<int64_t>(64, Dg - o0), P + o0 * kNR);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows.ntiles; ++i)
      rows.tile(i, P, 0, Dg, Dg, p * kNR, std::min<int64_t>(kNR, Da - p * kNR), 0, nullptr);
  }
  return sum_rows(rows.part, 1, B, T);
}

#endif  // GEFX_MICRO_AVX512

// ------------------------------------------------------------------------------ AMX kernel
#if GEFX_AMX

// y_r . a_r with y_r = g_r^T M[:, block] from the AMX Gram blocks of amx.h (float32 to float32
// accuracy on the bf16 tile unit): a work item is a block of rc active rows (padded to 32) x nb in
// features; Z = G[rows] M[:, block] (rc x nb, float32, Dg in chunks of kc, M packed straight from
// its rows: no transpose) and then, per row, Z[r] . a_r[block] into the row's partial sum of that
// column block (group): one term per group, summed in group order (sum_rows). Scratch per thread:
// Z and two A and two B packing buffers.
//
// Blocks from the shapes only (dense_amx_blocks): the (rc, nb, kc), powers of two, with the cheapest
// packing (g rows are repacked once per column block, M once per row block, at ~0.15 and ~0.12 ns a
// float: weights 1 and 0.8; chunks of 32 ~12% dearer) within the budget E (dense_budget, 4 E bytes)
// that leaves >= kDenseItems items where the rows allow.
constexpr int64_t kDenseAmxMaxRows = 512, kDenseAmxMaxCols = 256;

void dense_amx_blocks(int64_t n, int64_t Da, int64_t Dg, int64_t* rc, int64_t* nb, int64_t* kc) {
  amx_blocks(n, divup(Da, kAmxBlock) * kAmxBlock, kDenseAmxMaxRows, kDenseAmxMaxCols, 4, 0.8, 4 * dense_budget(n, Dg),
             kDenseItems, rc, nb, kc);
}

// Auto uses it from kDenseAmxMinD features on both sides and kDenseAmxMinMacs multiply-adds (N Da Dg):
// there it ran 1.2-1.9x the reference on the VM of bench/RESULTS.md, the micro kernel 1.03-1.4x
// (e.g. 512 tokens at 1024 features: 1.20-1.25x vs 1.06-1.09x); below, the micro kernel is as fast
// or faster (256 tokens at 1024 features: 1.24 vs 1.26x; at 256 features 1.1-1.4x vs 1.3-1.6x).
constexpr int64_t kDenseAmxMinD = 512;
constexpr double kDenseAmxMinMacs = double(1 << 28);

bool dense_amx_pays(int64_t N, int64_t Da, int64_t Dg) {
  return std::min(Da, Dg) >= kDenseAmxMinD && double(N) * Da * Dg >= kDenseAmxMinMacs;
}

at::Tensor dense_dot_amx(const View3& a, const View3& g, const float* pm, int64_t ldm, const MaskView& mask) {
  const int64_t B = a.B, T = a.T, Da = a.D, Dg = g.D;
  int64_t n = 0;  // active rows, padded to 32
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) n += mask.active(b, t) ? 1 : 0;
  if (n == 0) return at::zeros({B}, at::TensorOptions().dtype(at::kFloat));
  n = divup(n, kAmxBlock) * kAmxBlock;
  int64_t rc = 0, nb = 0, kc = 0;
  dense_amx_blocks(n, Da, Dg, &rc, &nb, &kc);
  const int64_t nrb = divup(n, rc), ncb = divup(Da, nb);
  MicroRows rows(a, g, mask, ncb, kAmxBlock);
  at::parallel_for(0, nrb * ncb, 1, [&](int64_t lo, int64_t hi) {
    AmxScratch scratch(rc * nb, nb, kc);
    float* z = scratch.floats;
    AmxTiles tiles;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t cb = item / nrb, q0 = (item % nrb) * rc, nr = std::min(rc, n - q0);
      const int64_t c0 = cb * nb, nv = std::min(nb, Da - c0), nc = divup(nv, kAmxBlock) * kAmxBlock;
      amx_gram(rows.g.data() + q0, AmxCols{nullptr, pm + c0, ldm, nv}, nr, nc, Dg, kc, z, nb, scratch.ab, scratch.bb);
      float* part = rows.part.data() + cb * rows.N;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t q = rows.row[q0 + r];
        if (q < 0) break;
        const float* zr = z + r * nb;
        const float* ar = rows.a[q0 + r] + c0;
        float x = 0;
#pragma omp simd reduction(+ : x)
        for (int64_t i = 0; i < nv; ++i) x += zr[i] * ar[i];
        part[q] += x;
      }
    }
  });
  return sum_rows(rows.part, ncb, B, T);
}

#endif  // GEFX_AMX

}  // namespace

at::Tensor dense_dot(const at::Tensor& a, const at::Tensor& g, const at::Tensor& m,
                     const std::optional<at::Tensor>& mask, int64_t kernel) {
  check_factor(a, "a");
  check_factor(g, "g");
  check_same_bt(a, g, "a", "g");
  TORCH_CHECK(m.device().is_cpu(), "gefx._C: m must be a CPU tensor");
  TORCH_CHECK(is_float_dtype(m.scalar_type()), "gefx._C: m must be a floating-point tensor, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == g.size(2) && m.size(1) == a.size(2), "gefx._C: m must be [out, in] = [",
              g.size(2), ", ", a.size(2), "], got ", m.sizes());
  TORCH_CHECK(kernel >= 0 && kernel <= 3,
              "gefx._C: dense_dot kernel must be 0 (auto), 1 (blas), 2 (micro) or 3 (amx), got ", kernel);
  const at::ScalarType acc = acc_type_of({&a, &g, &m});
  const int64_t B = a.size(0), T = a.size(1);
  if (B == 0 || T == 0 || a.size(2) == 0 || g.size(2) == 0) return at::zeros({B}, at::TensorOptions().dtype(acc));
  const MaskView mv = mask_view(mask, B, T, "mask");
  const View3 va = view3(a), vg = view3(g);
  // M as acc_t with unit column stride: a view when it already is, else one converted copy (the
  // size of the parameter, as in the reference).
  const at::Tensor mc = (m.scalar_type() == acc && m.stride(1) == 1 && m.stride(0) >= m.size(1))
                            ? m
                            : m.to(acc).contiguous();
  const int64_t ldm = g.size(2) == 1 ? a.size(2) : mc.stride(0);
  const bool micro = micro_eligible(va, vg, acc);
  const bool amx = micro && amx_available();
  TORCH_CHECK(kernel != 2 || micro, "gefx._C: the dense_dot micro kernel needs float32 a and g with unit feature "
              "stride on a CPU with AVX-512 (", micro_available() ? "the inputs are not" : "this CPU has none",
              ")");
  TORCH_CHECK(kernel != 3 || amx, "gefx._C: the dense_dot amx kernel needs float32 a and g with unit feature "
              "stride on a CPU with AMX bf16 tiles (",
              !amx_available() ? (GEFX_AMX ? "this CPU or OS has none" : "this build has no AMX code")
                               : "the inputs are not",
              ")");
#if GEFX_AMX
  // Auto: the AMX kernel for long products of wide layers (dense_amx_pays), else the micro kernel
  // where one of its layouts fits the budget, else BLAS tiles.
  if (kernel == 3 || (kernel == 0 && amx && dense_amx_pays(B * T, a.size(2), g.size(2))))
    return dense_dot_amx(va, vg, mc.data_ptr<float>(), ldm, mv);
#endif
#if GEFX_MICRO_AVX512
  if (micro && (kernel == 2 || (kernel == 0 && micro_layout(B * T, g.size(2)) != 0)))
    return dense_dot_micro(va, vg, mc.data_ptr<float>(), ldm, mv);
#endif
  if (acc == at::kDouble) return dense_dot_blas<double>(va, vg, mc.data_ptr<double>(), ldm, mv);
  return dense_dot_blas<float>(va, vg, mc.data_ptr<float>(), ldm, mv);
}

}  // namespace gefx
