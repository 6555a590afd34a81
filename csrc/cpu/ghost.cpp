// GEMM-based ops: ghost pairwise, self norms (symmetric), dense aggregate dot.
//
// Two exact algorithms for <G_i^T A_i, H_j^T B_j>, chosen per call by counting flops (algo 0):
//   ghost  sum_{t,s} (a_it . b_js)(g_it . h_js) over fixed-size token tiles: two Gram tiles
//          (kRowTile x kRowTile) from single-threaded BLAS calls, Hadamard-reduced at once into
//          per-(sample pair) sums; the T x S Gram is never formed. Self norms visit only token tiles
//          q >= p and count off-diagonal ones twice.
//   tile   one kWBlock x kWBlock block of the per-sample weight gradient G_i^T A_i at a time, for a
//          chunk of samples (T reduced in chunks of kTokChunk), then the blocks' inner products;
//          cheaper when T*S*(in+out) > (T+S)*in*out, i.e. long sequences and narrow layers.
// Work is split over tiles/blocks with at::parallel_for; each work item owns its output slot, and
// slots are summed in a fixed order, so results do not depend on the number of threads (except the
// tile algorithm's block groups, which are fixed too).
#include "../gefx_ops.h"
#include "common.h"

namespace gefx {

using namespace cpu;

namespace {

// Flat row tiles of one set ([B, T] tokens seen as B*T rows): whole samples grouped when T is
// short, even chunks of one sample's tokens otherwise. slot = chunk index within the sample.
struct RowTile {
  int64_t r0, n, slot;
};

std::vector<RowTile> row_tiles(int64_t B, int64_t T, int64_t bt, int64_t* nslots) {
  std::vector<RowTile> v;
  if (B == 0 || T == 0) {
    *nslots = 1;
    return v;
  }
  if (T > bt) {
    const int64_t nc = divup(T, bt), cs = divup(T, nc);
    *nslots = nc;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < nc; ++c) v.push_back({b * T + c * cs, std::min(cs, T - c * cs), c});
  } else {
    const int64_t k = std::max<int64_t>(1, bt / T);
    *nslots = 1;
    for (int64_t b0 = 0; b0 < B; b0 += k) v.push_back({b0 * T, std::min(k, B - b0) * T, 0});
  }
  return v;
}

// acc[i, j] += sum over the tile of w1[r] w2[c] ga[r, c] gg[r, c], split by sample.
template <typename acc_t>
void reduce_tile(const acc_t* ga, const acc_t* gg, int64_t n1, int64_t n2, const acc_t* w1, const acc_t* w2,
                 int64_t r01, int64_t T1, int64_t r02, int64_t T2, acc_t* acc, int64_t ld_acc) {
  for (int64_t r = 0; r < n1; ++r) {
    if (w1[r] == acc_t(0)) continue;
    const int64_t i = (r01 + r) / T1;
    const acc_t* pa = ga + r * n2;
    const acc_t* pg = gg + r * n2;
    int64_t c = 0;
    while (c < n2) {
      const int64_t j = (r02 + c) / T2;
      const int64_t cend = std::min(n2, (j + 1) * T2 - r02);
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = c; k < cend; ++k) s += w2[k] * pa[k] * pg[k];
      acc[i * ld_acc + j] += w1[r] * s;
      c = cend;
    }
  }
}

template <typename acc_t>
at::Tensor ghost_pairwise_ghost(const View3& a1, const View3& g1, const View3& a2, const View3& g2,
                                const MaskView& m1, const MaskView& m2) {
  const int64_t B1 = a1.B, T1 = a1.T, B2 = a2.B, T2 = a2.T;
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  int64_t ns1 = 1, ns2 = 1;
  const auto tiles1 = row_tiles(B1, T1, kRowTile, &ns1);
  const auto tiles2 = row_tiles(B2, T2, kRowTile, &ns2);
  at::Tensor part = at::zeros({ns1, B1, B2}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(tiles1.size()), 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    std::vector<acc_t> ba1, bg1, ba2, bg2, w1, w2, ga, gg;
    for (int64_t it = lo; it < hi; ++it) {
      const RowTile& t1 = tiles1[it];
      if (row_weights(m1, T1, t1.r0, t1.n, w1) == 0) continue;
      at::Tensor A1 = rows_matrix<acc_t>(a1, t1.r0, t1.n, 0, a1.D, ba1);
      at::Tensor G1 = rows_matrix<acc_t>(g1, t1.r0, t1.n, 0, g1.D, bg1);
      acc_t* acc = pp + t1.slot * B1 * B2;
      for (const RowTile& t2 : tiles2) {
        if (row_weights(m2, T2, t2.r0, t2.n, w2) == 0) continue;
        at::Tensor A2 = rows_matrix<acc_t>(a2, t2.r0, t2.n, 0, a2.D, ba2);
        at::Tensor G2 = rows_matrix<acc_t>(g2, t2.r0, t2.n, 0, g2.D, bg2);
        if (static_cast<int64_t>(ga.size()) < t1.n * t2.n) {
          ga.resize(t1.n * t2.n);
          gg.resize(t1.n * t2.n);
        }
        at::Tensor Ga = at::from_blob(ga.data(), {t1.n, t2.n}, opts);
        at::Tensor Gg = at::from_blob(gg.data(), {t1.n, t2.n}, opts);
        at::mm_out(Ga, A1, A2.t());
        at::mm_out(Gg, G1, G2.t());
        reduce_tile<acc_t>(ga.data(), gg.data(), t1.n, t2.n, w1.data(), w2.data(), t1.r0, T1, t2.r0, T2, acc, B2);
      }
    }
  });
  return ns1 == 1 ? part[0].clone() : part.sum(0);
}

// Block [o0, o0+bo) x [i0, i0+bi) of G_b^T A_b (masked tokens dropped) into w (bo x bi, contiguous).
template <typename acc_t>
void weight_block(const View3& a, const View3& g, const MaskView& m, int64_t b, int64_t o0, int64_t bo,
                  int64_t i0, int64_t bi, acc_t* w, std::vector<acc_t>& ba, std::vector<acc_t>& bg) {
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  at::Tensor W = at::from_blob(w, {bo, bi}, opts);
  bool first = true;
  for (int64_t t0 = 0; t0 < a.T; t0 += kTokChunk) {
    const int64_t nt = std::min(kTokChunk, a.T - t0);
    at::Tensor Gt = rows_matrix<acc_t>(g, b * g.T + t0, nt, o0, bo, bg);
    at::Tensor At = rows_matrix<acc_t>(a, b * a.T + t0, nt, i0, bi, ba, &m);
    if (first) {
      at::mm_out(W, Gt.t(), At);
      first = false;
    } else {
      W.addmm_(Gt.t(), At);
    }
  }
  if (first) W.zero_();
}

// Tile algorithm for pairs (self == true: a2/g2 are a1/g1 and only the diagonal is wanted).
// Returns [B1, B2] (or [B1] for self).
template <typename acc_t>
at::Tensor tile_algo(const View3& a1, const View3& g1, const MaskView& m1, const View3& a2, const View3& g2,
                     const MaskView& m2, bool self) {
  const int64_t B1 = a1.B, B2 = self ? 1 : a2.B, Da = a1.D, Dg = g1.D;
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  const int64_t nob = divup(Dg, kWBlock), nib = divup(Da, kWBlock), nb = nob * nib;
  // Fixed block groups (independent of the thread count) -> deterministic sums.
  const int64_t per = std::max<int64_t>(1, B1 * B2);
  const int64_t ng = std::max<int64_t>(1, std::min<int64_t>({nb, 32, std::max<int64_t>(1, (int64_t(1) << 24) / per)}));
  at::Tensor part = at::zeros({ng, B1, B2}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, ng, 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    std::vector<acc_t> ba, bg, w1, w2;
    for (int64_t grp = lo; grp < hi; ++grp) {
      acc_t* acc = pp + grp * B1 * B2;
      for (int64_t blk = grp * nb / ng; blk < (grp + 1) * nb / ng; ++blk) {
        const int64_t o0 = (blk / nib) * kWBlock, i0 = (blk % nib) * kWBlock;
        const int64_t bo = std::min(kWBlock, Dg - o0), bi = std::min(kWBlock, Da - i0), bs = bo * bi;
        for (int64_t s1 = 0; s1 < B1; s1 += kSampleChunk) {
          const int64_t c1 = std::min(kSampleChunk, B1 - s1);
          w1.resize(c1 * bs);
          for (int64_t k = 0; k < c1; ++k) weight_block<acc_t>(a1, g1, m1, s1 + k, o0, bo, i0, bi, w1.data() + k * bs, ba, bg);
          if (self) {
            for (int64_t k = 0; k < c1; ++k) {
              const acc_t* w = w1.data() + k * bs;
              acc[s1 + k] += dot(w, w, bs);
            }
            continue;
          }
          at::Tensor W1 = at::from_blob(w1.data(), {c1, bs}, opts);
          for (int64_t s2 = 0; s2 < B2; s2 += kSampleChunk) {
            const int64_t c2 = std::min(kSampleChunk, B2 - s2);
            w2.resize(c2 * bs);
            for (int64_t k = 0; k < c2; ++k) weight_block<acc_t>(a2, g2, m2, s2 + k, o0, bo, i0, bi, w2.data() + k * bs, ba, bg);
            at::Tensor W2 = at::from_blob(w2.data(), {c2, bs}, opts);
            at::Tensor P = at::mm(W1, W2.t());
            const acc_t* p = P.data_ptr<acc_t>();
            for (int64_t x = 0; x < c1; ++x)
              for (int64_t y = 0; y < c2; ++y) acc[(s1 + x) * B2 + s2 + y] += p[x * c2 + y];
          }
        }
      }
    }
  });
  at::Tensor out = ng == 1 ? part[0].clone() : part.sum(0);
  return self ? out.reshape({B1}) : out;
}

template <typename acc_t>
at::Tensor ghost_self_ghost(const View3& a, const View3& g, const MaskView& m) {
  const int64_t B = a.B, T = a.T;
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  const int64_t nc = divup(T, kRowTile), cs = divup(T, nc);
  const int64_t np = nc * (nc + 1) / 2;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t q = p; q < nc; ++q) pairs.emplace_back(p, q);
  at::Tensor part = at::zeros({B, np}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, B * np, 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    std::vector<acc_t> bap, bgp, baq, bgq, wp, wq, ga, gg;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / np, k = item % np;
      const int64_t p = pairs[k].first, q = pairs[k].second;
      const int64_t tp = p * cs, np_ = std::min(cs, T - tp), tq = q * cs, nq = std::min(cs, T - tq);
      if (row_weights(m, T, b * T + tp, np_, wp) == 0 || row_weights(m, T, b * T + tq, nq, wq) == 0) continue;
      at::Tensor Ap = rows_matrix<acc_t>(a, b * T + tp, np_, 0, a.D, bap);
      at::Tensor Gp = rows_matrix<acc_t>(g, b * T + tp, np_, 0, g.D, bgp);
      at::Tensor Aq = p == q ? Ap : rows_matrix<acc_t>(a, b * T + tq, nq, 0, a.D, baq);
      at::Tensor Gq = p == q ? Gp : rows_matrix<acc_t>(g, b * T + tq, nq, 0, g.D, bgq);
      acc_t s = 0;
      const int64_t need = p != q ? np_ * nq : std::min(kStrip, np_) * np_;
      if (static_cast<int64_t>(ga.size()) < need) {
        ga.resize(need);
        gg.resize(need);
      }
      if (p != q) {
        at::Tensor Ga = at::from_blob(ga.data(), {np_, nq}, opts);
        at::Tensor Gg = at::from_blob(gg.data(), {np_, nq}, opts);
        at::mm_out(Ga, Ap, Aq.t());
        at::mm_out(Gg, Gp, Gq.t());
        // One sample per tile: rows and columns lie inside sample b, so reduce_tile adds to s.
        reduce_tile<acc_t>(ga.data(), gg.data(), np_, nq, wp.data(), wq.data(), tp, T, tq, T, &s, 1);
        s *= 2;
      } else {
        // Diagonal tile: strips of kStrip rows against the columns from the strip's first row on.
        // The strip's own square block is symmetric and counted whole; the rest of the strip twice.
        for (int64_t r0 = 0; r0 < np_; r0 += kStrip) {
          const int64_t h = std::min(kStrip, np_ - r0), nc_ = np_ - r0;
          at::Tensor Ga = at::from_blob(ga.data(), {h, nc_}, opts);
          at::Tensor Gg = at::from_blob(gg.data(), {h, nc_}, opts);
          at::mm_out(Ga, Ap.narrow(0, r0, h), Ap.narrow(0, r0, nc_).t());
          at::mm_out(Gg, Gp.narrow(0, r0, h), Gp.narrow(0, r0, nc_).t());
          acc_t sd = 0, so = 0;
          const acc_t* w = wp.data() + r0;
          for (int64_t r = 0; r < h; ++r) {
            if (w[r] == acc_t(0)) continue;
            const acc_t* pa = ga.data() + r * nc_;
            const acc_t* pg = gg.data() + r * nc_;
            acc_t x = 0, y = 0;
#pragma omp simd reduction(+ : x)
            for (int64_t c = 0; c < h; ++c) x += w[c] * pa[c] * pg[c];
#pragma omp simd reduction(+ : y)
            for (int64_t c = h; c < nc_; ++c) y += w[c] * pa[c] * pg[c];
            sd += x;
            so += y;
          }
          s += sd + 2 * so;
        }
      }
      pp[b * np + k] = s;
    }
  });
  return part.sum(1);
}

// Flops (multiply-adds) of each algorithm; the tile one pays more per flop (its GEMMs have K = T and
// 128 x 128 outputs: about 60-70% of the ghost tiles' rate, measured single-threaded).
double ghost_pair_cost(int64_t B1, int64_t T1, int64_t B2, int64_t T2, int64_t Da, int64_t Dg) {
  return double(B1) * B2 * T1 * T2 * (Da + Dg);
}

double tile_pair_cost(int64_t B1, int64_t T1, int64_t B2, int64_t T2, int64_t Da, int64_t Dg) {
  const double chunks1 = double(divup(std::max<int64_t>(B1, 1), kSampleChunk));
  return 1.6 * (double(B1) * T1 + chunks1 * B2 * T2 + double(B1) * B2) * Da * Dg;
}

double ghost_self_cost(int64_t B, int64_t T, int64_t Da, int64_t Dg) {
  const int64_t nc = divup(std::max<int64_t>(T, 1), kRowTile), cs = divup(std::max<int64_t>(T, 1), nc);
  // off-diagonal tile pairs in full, diagonal tiles in strips (about (cs + kStrip) / (2 cs) of a tile)
  return double(B) * (nc * (nc - 1) / 2 * cs * cs + nc * cs * (cs + kStrip) / 2.0) * (Da + Dg);
}

double tile_self_cost(int64_t B, int64_t T, int64_t Da, int64_t Dg) {
  return 1.6 * double(B) * (T + 1) * Da * Dg;
}

at::ScalarType acc_type_of(std::initializer_list<const at::Tensor*> xs) {
  return any_double(xs) ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor ghost_pairwise(const at::Tensor& a1, const at::Tensor& g1, const at::Tensor& a2, const at::Tensor& g2,
                          const std::optional<at::Tensor>& mask1, const std::optional<at::Tensor>& mask2,
                          int64_t algo) {
  check_factor(a1, "a1");
  check_factor(g1, "g1");
  check_factor(a2, "a2");
  check_factor(g2, "g2");
  check_same_bt(a1, g1, "a1", "g1");
  check_same_bt(a2, g2, "a2", "g2");
  TORCH_CHECK(a1.size(2) == a2.size(2), "gefx._C: a1 and a2 feature sizes differ (", a1.size(2), " vs ",
              a2.size(2), ")");
  TORCH_CHECK(g1.size(2) == g2.size(2), "gefx._C: g1 and g2 feature sizes differ (", g1.size(2), " vs ",
              g2.size(2), ")");
  TORCH_CHECK(algo >= 0 && algo <= 2, "gefx._C: algo must be 0 (auto), 1 (ghost) or 2 (tile)");
  const at::ScalarType acc = acc_type_of({&a1, &g1, &a2, &g2});
  const int64_t B1 = a1.size(0), T1 = a1.size(1), B2 = a2.size(0), T2 = a2.size(1);
  if (B1 == 0 || B2 == 0 || T1 == 0 || T2 == 0 || a1.size(2) == 0 || g1.size(2) == 0)
    return at::zeros({B1, B2}, at::TensorOptions().dtype(acc));
  const MaskView m1 = mask_view(mask1, B1, T1, "mask1"), m2 = mask_view(mask2, B2, T2, "mask2");
  const View3 va1 = view3(a1), vg1 = view3(g1), va2 = view3(a2), vg2 = view3(g2);
  const int64_t Da = a1.size(2), Dg = g1.size(2);
  const bool tile = algo == 2 || (algo == 0 && tile_pair_cost(B1, T1, B2, T2, Da, Dg) <
                                                   ghost_pair_cost(B1, T1, B2, T2, Da, Dg));
  if (acc == at::kDouble)
    return tile ? tile_algo<double>(va1, vg1, m1, va2, vg2, m2, false)
                : ghost_pairwise_ghost<double>(va1, vg1, va2, vg2, m1, m2);
  return tile ? tile_algo<float>(va1, vg1, m1, va2, vg2, m2, false)
              : ghost_pairwise_ghost<float>(va1, vg1, va2, vg2, m1, m2);
}

at::Tensor ghost_self(const at::Tensor& a, const at::Tensor& g, const std::optional<at::Tensor>& mask,
                      int64_t algo) {
  check_factor(a, "a");
  check_factor(g, "g");
  check_same_bt(a, g, "a", "g");
  TORCH_CHECK(algo >= 0 && algo <= 2, "gefx._C: algo must be 0 (auto), 1 (ghost) or 2 (tile)");
  const at::ScalarType acc = acc_type_of({&a, &g});
  const int64_t B = a.size(0), T = a.size(1), Da = a.size(2), Dg = g.size(2);
  if (B == 0 || T == 0 || Da == 0 || Dg == 0) return at::zeros({B}, at::TensorOptions().dtype(acc));
  const MaskView m = mask_view(mask, B, T, "mask");
  const View3 va = view3(a), vg = view3(g);
  const bool tile = algo == 2 || (algo == 0 && tile_self_cost(B, T, Da, Dg) < ghost_self_cost(B, T, Da, Dg));
  if (acc == at::kDouble)
    return tile ? tile_algo<double>(va, vg, m, va, vg, m, true) : ghost_self_ghost<double>(va, vg, m);
  return tile ? tile_algo<float>(va, vg, m, va, vg, m, true) : ghost_self_ghost<float>(va, vg, m);
}

namespace {

// v[b] = sum_t g_bt^T M a_bt over chunks of flat rows (crossing samples): Z = A_chunk M^T is one
// multithreaded GEMM at full BLAS rate, then each row of Z is dotted with its row of G in parallel.
// The chunk holds at most max(kDenseMinTile, N * Dg / 10) elements of Z: a fixed-size tile that is
// at most a tenth of the reference's A M^T product (or a small floor), however large the problem.
template <typename acc_t>
at::Tensor dense_dot_impl(const View3& a, const View3& g, const at::Tensor& m, const MaskView& mask) {
  const int64_t B = a.B, T = a.T, Dg = g.D, N = B * T;
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  // M as acc_t with unit column stride: a view when it already is, else one converted copy (the
  // size of the parameter, as in the reference).
  at::Tensor mc = (m.scalar_type() == acc_scalar<acc_t>() && m.stride(1) == 1 && m.stride(0) >= m.size(1))
                      ? m
                      : m.to(acc_scalar<acc_t>()).contiguous();
  at::Tensor tok = at::zeros({N}, opts);
  acc_t* pt = tok.data_ptr<acc_t>();
  if (N == 0 || Dg == 0) return tok.view({B, T}).sum(1);
  const int64_t cap = std::max<int64_t>(kDenseMinTile, N * Dg / 10);
  const int64_t rows = std::clamp<int64_t>(cap / Dg, 1, N);
  std::vector<acc_t> ba, w;
  at::Tensor Z = at::empty({rows, Dg}, opts);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    if (row_weights(mask, T, r0, n, w) == 0) continue;
    at::Tensor A = rows_matrix<acc_t>(a, r0, n, 0, a.D, ba);
    at::Tensor Zn = Z.narrow(0, 0, n);
    at::mm_out(Zn, A, mc.t());
    const acc_t* pz = Zn.data_ptr<acc_t>();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> grow(Dg);
      for (int64_t r = lo; r < hi; ++r) {
        if (w[r] == acc_t(0)) continue;
        load_row<acc_t>(g, (r0 + r) / T, (r0 + r) % T, 0, Dg, grow.data());
        pt[r0 + r] += dot(pz + r * Dg, grow.data(), Dg);
      }
    });
  }
  return tok.view({B, T}).sum(1);
}

}  // namespace

at::Tensor dense_dot(const at::Tensor& a, const at::Tensor& g, const at::Tensor& m,
                     const std::optional<at::Tensor>& mask) {
  check_factor(a, "a");
  check_factor(g, "g");
  check_same_bt(a, g, "a", "g");
  TORCH_CHECK(m.device().is_cpu(), "gefx._C: m must be a CPU tensor");
  TORCH_CHECK(is_float_dtype(m.scalar_type()), "gefx._C: m must be a floating-point tensor, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == g.size(2) && m.size(1) == a.size(2), "gefx._C: m must be [out, in] = [",
              g.size(2), ", ", a.size(2), "], got ", m.sizes());
  const at::ScalarType acc = acc_type_of({&a, &g, &m});
  const int64_t B = a.size(0), T = a.size(1);
  if (B == 0 || T == 0 || a.size(2) == 0 || g.size(2) == 0) return at::zeros({B}, at::TensorOptions().dtype(acc));
  const MaskView mv = mask_view(mask, B, T, "mask");
  if (acc == at::kDouble) return dense_dot_impl<double>(view3(a), view3(g), m, mv);
  return dense_dot_impl<float>(view3(a), view3(g), m, mv);
}

}  // namespace gefx
