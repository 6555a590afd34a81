// Token-id ops (embedding tables) and per-sample gradients of elementwise weights.
//
// The embedding Gram [id_it == id'_js] is sparse: per sample, the live tokens are sorted by id once
// (O(T) integers), then a pair of samples is a merge join of their sorted ids, and a shared id adds
// (sum of its g rows) . (sum of its g' rows). Cost O((T + S) * D) per pair at worst instead of
// O(T * S * D); self norms are O(T * D) per sample. Only D-long row buffers are allocated.
#include "../gefx_ops.h"
#include "common.h"

namespace gefx {

using namespace cpu;

namespace {

// Live (unmasked) tokens of every sample sorted by (id, t): order[off[b] .. off[b+1]) holds t's.
struct SortedIds {
  std::vector<int64_t> off, tok, id;
};

SortedIds sort_ids(const IdView& ids, const MaskView& m, int64_t B, int64_t T) {
  SortedIds s;
  s.off.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t live = 0;
    for (int64_t t = 0; t < T; ++t) live += m.active(b, t);
    s.off[b + 1] = s.off[b] + live;
  }
  s.tok.resize(s.off[B]);
  s.id.resize(s.off[B]);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<std::pair<int64_t, int64_t>> kv;
    for (int64_t b = lo; b < hi; ++b) {
      kv.clear();
      for (int64_t t = 0; t < T; ++t)
        if (m.active(b, t)) kv.emplace_back(ids.at(b, t), t);
      std::sort(kv.begin(), kv.end());
      for (size_t k = 0; k < kv.size(); ++k) {
        s.id[s.off[b] + k] = kv[k].first;
        s.tok[s.off[b] + k] = kv[k].second;
      }
    }
  });
  return s;
}

// buf = sum of rows g[b, tok[k]] for k in [k0, k1); returns buf.data().
template <typename acc_t>
const acc_t* group_sum(const View3& g, int64_t b, const int64_t* tok, int64_t k0, int64_t k1, std::vector<acc_t>& buf,
                       std::vector<acc_t>& row) {
  const int64_t D = g.D;
  load_row<acc_t>(g, b, tok[k0], 0, D, buf.data());
  for (int64_t k = k0 + 1; k < k1; ++k) {
    load_row<acc_t>(g, b, tok[k], 0, D, row.data());
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) buf[d] += row[d];
  }
  return buf.data();
}

template <typename acc_t>
at::Tensor embedding_pairwise_impl(const IdView& ids1, const View3& g1, const MaskView& m1, const IdView& ids2,
                                   const View3& g2, const MaskView& m2) {
  const int64_t B1 = g1.B, B2 = g2.B, D = g1.D;
  const SortedIds s1 = sort_ids(ids1, m1, B1, g1.T), s2 = sort_ids(ids2, m2, B2, g2.T);
  at::Tensor out = at::zeros({B1, B2}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
  acc_t* po = out.data_ptr<acc_t>();
  at::parallel_for(0, B1 * B2, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> x(D), y(D), row(D);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t i = item / B2, j = item % B2;
      int64_t p = s1.off[i], pe = s1.off[i + 1], q = s2.off[j], qe = s2.off[j + 1];
      acc_t total = 0;
      while (p < pe && q < qe) {
        const int64_t u = s1.id[p], v = s2.id[q];
        if (u < v) {
          ++p;
        } else if (v < u) {
          ++q;
        } else {
          int64_t p1 = p, q1 = q;
          while (p1 < pe && s1.id[p1] == u) ++p1;
          while (q1 < qe && s2.id[q1] == u) ++q1;
          const acc_t* xs = group_sum<acc_t>(g1, i, s1.tok.data(), p, p1, x, row);
          const acc_t* ys = group_sum<acc_t>(g2, j, s2.tok.data(), q, q1, y, row);
          total += dot(xs, ys, D);
          p = p1;
          q = q1;
        }
      }
      po[item] = total;
    }
  });
  return out;
}

template <typename acc_t>
at::Tensor embedding_self_impl(const IdView& ids, const View3& g, const MaskView& m) {
  const int64_t B = g.B, D = g.D;
  const SortedIds s = sort_ids(ids, m, B, g.T);
  at::Tensor out = at::zeros({B}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
  acc_t* po = out.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> x(D), row(D);
    for (int64_t b = lo; b < hi; ++b) {
      acc_t total = 0;
      for (int64_t p = s.off[b], pe = s.off[b + 1]; p < pe;) {
        int64_t p1 = p;
        while (p1 < pe && s.id[p1] == s.id[p]) ++p1;
        const acc_t* xs = group_sum<acc_t>(g, b, s.tok.data(), p, p1, x, row);
        total += dot(xs, xs, D);
        p = p1;
      }
      po[b] = total;
    }
  });
  return out;
}

template <typename acc_t>
at::Tensor embedding_dense_dot_impl(const IdView& ids, const View3& g, const View3& m, const MaskView& mask) {
  const int64_t B = g.B, T = g.T, D = g.D, V = m.T;
  at::Tensor out = at::zeros({B}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
  acc_t* po = out.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> x(D), y(D);
    for (int64_t b = lo; b < hi; ++b) {
      acc_t total = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!mask.active(b, t)) continue;
        const int64_t id = ids.at(b, t);
        TORCH_CHECK(id >= 0 && id < V, "gefx._C: token id ", id, " out of range for a table of ", V, " rows");
        load_row<acc_t>(g, b, t, 0, D, x.data());
        load_row<acc_t>(m, 0, id, 0, D, y.data());
        total += dot(x.data(), y.data(), D);
      }
      po[b] = total;
    }
  });
  return out;
}

template <typename acc_t>
at::Tensor norm_grad_impl(const View3& u, const View3& g, const MaskView& mask) {
  const int64_t B = u.B, T = u.T, D = u.D;
  constexpr int64_t kChunk = 1024;
  const int64_t nch = divup(D, kChunk);
  at::Tensor out = at::zeros({B, D}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
  acc_t* po = out.data_ptr<acc_t>();
  at::parallel_for(0, B * nch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> x(kChunk), y(kChunk);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / nch, d0 = (item % nch) * kChunk, n = std::min(kChunk, D - d0);
      acc_t* acc = po + b * D + d0;
      for (int64_t t = 0; t < T; ++t) {
        if (!mask.active(b, t)) continue;
        load_row<acc_t>(u, b, t, d0, n, x.data());
        load_row<acc_t>(g, b, t, d0, n, y.data());
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) acc[k] += x[k] * y[k];
      }
    }
  });
  return out;
}

void check_ids_g(const at::Tensor& ids, const at::Tensor& g, const char* ni, const char* ng) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == g.size(0) && ids.size(1) == g.size(1), "gefx._C: ", ni, " ",
              ids.sizes(), " and ", ng, " ", g.sizes(), " disagree on [B, T]");
}

}  // namespace

at::Tensor embedding_pairwise(const at::Tensor& ids1, const at::Tensor& g1, const at::Tensor& ids2,
                              const at::Tensor& g2, const std::optional<at::Tensor>& mask1,
                              const std::optional<at::Tensor>& mask2) {
  check_factor(g1, "g1");
  check_factor(g2, "g2");
  const IdView i1 = id_view(ids1, "ids1"), i2 = id_view(ids2, "ids2");
  check_ids_g(ids1, g1, "ids1", "g1");
  check_ids_g(ids2, g2, "ids2", "g2");
  TORCH_CHECK(g1.size(2) == g2.size(2), "gefx._C: g1 and g2 feature sizes differ (", g1.size(2), " vs ",
              g2.size(2), ")");
  const MaskView m1 = mask_view(mask1, g1.size(0), g1.size(1), "mask1");
  const MaskView m2 = mask_view(mask2, g2.size(0), g2.size(1), "mask2");
  if (any_double({&g1, &g2})) return embedding_pairwise_impl<double>(i1, view3(g1), m1, i2, view3(g2), m2);
  return embedding_pairwise_impl<float>(i1, view3(g1), m1, i2, view3(g2), m2);
}

at::Tensor embedding_self(const at::Tensor& ids, const at::Tensor& g, const std::optional<at::Tensor>& mask) {
  check_factor(g, "g");
  const IdView iv = id_view(ids, "ids");
  check_ids_g(ids, g, "ids", "g");
  const MaskView m = mask_view(mask, g.size(0), g.size(1), "mask");
  if (g.scalar_type() == at::kDouble) return embedding_self_impl<double>(iv, view3(g), m);
  return embedding_self_impl<float>(iv, view3(g), m);
}

at::Tensor embedding_dense_dot(const at::Tensor& ids, const at::Tensor& g, const at::Tensor& m,
                               const std::optional<at::Tensor>& mask) {
  check_factor(g, "g");
  const IdView iv = id_view(ids, "ids");
  check_ids_g(ids, g, "ids", "g");
  TORCH_CHECK(m.device().is_cpu(), "gefx._C: m must be a CPU tensor");
  TORCH_CHECK(is_float_dtype(m.scalar_type()), "gefx._C: m must be a floating-point tensor, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(1) == g.size(2), "gefx._C: m must be [V, ", g.size(2), "], got ", m.sizes());
  const MaskView mv = mask_view(mask, g.size(0), g.size(1), "mask");
  if (any_double({&g, &m})) return embedding_dense_dot_impl<double>(iv, view3(g), view2(m), mv);
  return embedding_dense_dot_impl<float>(iv, view3(g), view2(m), mv);
}

at::Tensor norm_grad(const at::Tensor& u, const at::Tensor& g, const std::optional<at::Tensor>& mask) {
  check_factor(u, "u");
  check_factor(g, "g");
  TORCH_CHECK(u.sizes() == g.sizes(), "gefx._C: u ", u.sizes(), " and g ", g.sizes(), " must have the same shape");
  const MaskView mv = mask_view(mask, u.size(0), u.size(1), "mask");
  if (any_double({&u, &g})) return norm_grad_impl<double>(view3(u), view3(g), mv);
  return norm_grad_impl<float>(view3(u), view3(g), mv);
}

}  // namespace gefx
