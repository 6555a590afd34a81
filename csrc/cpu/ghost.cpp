// GEMM-based ops: ghost pairwise and self norms (symmetric). dense_dot is in dense.cpp.
//
// Two exact algorithms for <G_i^T A_i, H_j^T B_j>, chosen per call by counting flops (algo 0):
//   ghost  sum_{t,s} (a_it . b_js)(g_it . h_js) over token tiles: two Gram tiles (bl x bs rows of
//          the two sets, pair_tiles) from single-threaded BLAS calls, Hadamard-reduced at once into
//          per-(sample pair) sums; the T x S Gram is never formed. For float32 pairs (kernel 0 =
//          auto, 1 = BLAS, 2 = micro, 3 = amx) the Gram blocks come from the dot-form micro kernel
//          of micro.h on small Grams of long features (AVX-512; ghost_pairwise_micro), or from the
//          AMX bf16 tiles of amx.h at float32 accuracy on large ones (ghost_pairwise_amx). Self norms:
//          strips of kSelfStrip tokens against the tokens from the strip on (self_tiles); the
//          strip's own square block counts once, the rest twice.
//   tile   one b x b block of the per-sample weight gradient G_i^T A_i at a time (weight_block_side),
//          for a chunk of samples (T reduced in chunks of kTokChunk), then the blocks' inner
//          products; cheaper when T*S*(in+out) > (T+S)*in*out, i.e. long sequences and narrow layers.
// Work is split over tiles/strips/blocks with at::parallel_for; each work item owns its output
// slot, slots are summed in a fixed order, and every tile size depends on the shapes only, so
// results do not depend on the number of threads (the tile algorithm's block groups are fixed too).
// BLAS runs single-threaded inside each work item (SerialBlas), called directly (gemm in common.h).
#include "../gefx_ops.h"
#include "amx.h"
#include "common.h"
#include "micro.h"

#include <cmath>

namespace gefx {

using namespace cpu;

namespace {

// ---- tile sizes. Each depends on the problem's shape only (never on the thread count), so results
// do not depend on the number of threads. BLAS is MKL-like: a GEMM C[m, n] = A B^T runs fastest, at
// tile sizes this small, when one side is short (32-48) and the other long (256-1024); every tile
// below is arranged that way (the short side is the GEMM's m in column-major terms). The reference
// (gefx/reference.py) holds about three Gram-sized buffers (pairs: B1 T1 x B2 T2, self norms:
// B T^2); the rules below keep one thread's scratch at most 1/8 of the Gram (self norms: 1/16), i.e.
// about threads / 24 (threads / 48) of the reference's peak, while large problems get full-size tiles.

// Ghost pairwise Gram tiles: bs = kPairShort (32) rows of set 2 (one work item each) against
// bl = kPairLong (512) rows of set 1, halved (down to 32) until the two bl x bs tiles of a thread
// hold at most 1/8 of the B1 T1 x B2 T2 Gram (2 bl bs <= rows1 rows2 / 8). 512 x 32 tiles run
// within about 10% of 256 x 256 ones (single-threaded MKL, K = 256..1024) with 1/4 of their memory.
// Large Grams (where 1/8 of the Gram allows it) get bs doubled, up to kPairShortMax (256) and while
// set 2 still gives >= 8 work items (short tiles): 512 x 256 tiles run ~10% faster than 512 x 32
// (2048 x 2048 tokens at 4096 features: 0.79-0.81x -> 0.88-0.90x the reference).
void pair_tiles(int64_t rows1, int64_t rows2, int64_t* bl, int64_t* bs) {
  int64_t l = kPairLong;
  while (l > kPairShort && 16.0 * l * kPairShort > double(rows1) * double(rows2)) l /= 2;
  int64_t s = kPairShort;
  while (s < kPairShortMax && 16.0 * l * (2 * s) <= double(rows1) * double(rows2) && rows2 >= 8 * (2 * s)) s *= 2;
  *bl = l;
  *bs = s;
}

// Self norms: strips of kSelfStrip (32) tokens of one sample against the columns from the strip's
// first token on, kSelfCols (512) columns per product, halved (down to 32) until a thread's two
// products (2 x cols x 32) hold at most 1/16 of the B T^2 Gram (twice the pairs' margin: the
// reference's self-norm peak measures below its three B T^2 buffers, ~0.6 MiB at B = 4, T = 128).
void self_tiles(int64_t B, int64_t T, int64_t* h, int64_t* cmax) {
  int64_t c = kSelfCols;
  while (c > kSelfStrip && 32.0 * c * kSelfStrip > double(B) * T * T) c /= 2;
  *h = kSelfStrip;
  *cmax = c;
}

// Tile algorithm: side b of the square weight-gradient blocks, the largest of 256, 128, 64 such that
// a thread's blocks ((c1 + c2) b^2 for sample chunks of c1, c2 <= kSampleChunk) hold at most 1/8 of
// the problem's Gram and at most kWBlockMaxElems (8 MiB fp32), and the weight splits into >= 4
// blocks (work items).
int64_t weight_block_side(int64_t B1, int64_t T1, int64_t B2, int64_t T2, int64_t Da, int64_t Dg, bool self) {
  const int64_t c = std::min(B1, kSampleChunk) + (self ? 0 : std::min(B2, kSampleChunk));
  const double gram = self ? double(B1) * T1 * T1 : double(B1) * T1 * double(B2) * T2;
  const double cap = std::min(gram / 8, double(kWBlockMaxElems));
  for (int64_t b = kWBlockLarge; b > kWBlockMin; b /= 2)
    if (double(c) * b * b <= cap && divup(Da, b) * divup(Dg, b) >= 4) return b;
  return kWBlockMin;
}

// Relative cost per multiply-add of the tile algorithm's GEMMs (K = T, b x b outputs) against the
// ghost tiles', measured (2-core AVX-512 VM, MKL, 2 threads): about 1.0 at b = 256, 1.3 at 128,
// 1.6 at 64.
double wblock_factor(int64_t b) { return b >= 256 ? 1.0 : b >= 128 ? 1.3 : 1.6; }

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
  int64_t bl = 0, bs = 0;
  pair_tiles(B1 * T1, B2 * T2, &bl, &bs);
  int64_t ns1 = 1, ns2 = 1;
  const auto tiles1 = row_tiles(B1, T1, bl, &ns1);  // long tiles (GEMM n), inner loop
  const auto tiles2 = row_tiles(B2, T2, bs, &ns2);  // short tiles (GEMM m), one work item each
  at::Tensor part = at::zeros({ns2, B1, B2}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(tiles2.size()), 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    SerialBlas serial;
    std::vector<acc_t> ba1, bg1, ba2, bg2, w1, w2;
    Scratch<acc_t> sa, sg;
    for (int64_t it = lo; it < hi; ++it) {
      const RowTile& t2 = tiles2[it];
      if (row_weights(m2, T2, t2.r0, t2.n, w2) == 0) continue;
      at::Tensor A2 = rows_matrix<acc_t>(a2, t2.r0, t2.n, 0, a2.D, ba2);
      at::Tensor G2 = rows_matrix<acc_t>(g2, t2.r0, t2.n, 0, g2.D, bg2);
      acc_t* acc = pp + t2.slot * B1 * B2;  // (sample j, slot) of set 2 belongs to this item only
      for (const RowTile& t1 : tiles1) {
        if (row_weights(m1, T1, t1.r0, t1.n, w1) == 0) continue;
        at::Tensor A1 = rows_matrix<acc_t>(a1, t1.r0, t1.n, 0, a1.D, ba1);
        at::Tensor G1 = rows_matrix<acc_t>(g1, t1.r0, t1.n, 0, g1.D, bg1);
        acc_t* ga = sa.get(t1.n * t2.n);
        acc_t* gg = sg.get(t1.n * t2.n);
        gemm_nt<acc_t>(t1.n, t2.n, a1.D, A1.data_ptr<acc_t>(), ld_of(A1), A2.data_ptr<acc_t>(), ld_of(A2), ga);
        gemm_nt<acc_t>(t1.n, t2.n, g1.D, G1.data_ptr<acc_t>(), ld_of(G1), G2.data_ptr<acc_t>(), ld_of(G2), gg);
        reduce_tile<acc_t>(ga, gg, t1.n, t2.n, w1.data(), w2.data(), t1.r0, T1, t2.r0, T2, acc, B2);
      }
    }
  });
  return ns2 == 1 ? part[0].clone() : part.sum(0);
}

// ---------------------------------------------------------------- ghost pairwise, micro kernel
#if GEFX_MICRO_AVX512

// The same sum with the dot-form Gram tile of micro.h (float32, unit feature stride, AVX-512): rows
// are read in place, nothing is packed. The active rows of each set (masked tokens dropped) are
// padded to whole micro-tiles with rows of sample -1. A work item is a Gram block: rc rows of set 1
// x nb rows of set 2 (pair_micro_blocks), held in two buffers ga, gg (rc x nb each, the only
// scratch). For each part (a, then g) and chunk of <= kGramK features, every 6-row group of the
// block's set-1 rows (24 KiB: in L1) runs past the chunk of its nb set-2 rows (<= 512 KiB: in L2) in
// 6 x 4 micro-tiles, adding into the buffer; then ga * gg is summed per (sample i, sample j) into
// the item's own partial sums, which are added in item order: results do not depend on the number
// of threads.
constexpr int64_t kGramK = 1024;          // features per micro-tile call
constexpr int64_t kPairMicroCols = 128;   // nb: set-2 rows per block, at most,
constexpr int64_t kPairMicroBlockBytes = 1 << 20;  // and at most ~1 MiB of their a and g features (L2)
constexpr int64_t kPairMicroRows = 96;    // rc: set-1 rows per block, at most
constexpr int64_t kPairMicroItems = 8;    // work items wanted (rc is cut down to 6 for small problems)
// Auto: the micro kernel where the BLAS Gram tiles would be small (a Gram of at most kPairMicroMaxCells
// token pairs, whose tiles are capped at 1/8 of it: 32 x 32 at 128 x 128, where single-threaded MKL
// runs at half its rate), the features long enough (>= kPairMicroMinD) for its horizontal sums to
// pay, and the problem small enough (<= kPairMicroMaxMacs multiply-adds) that its blocks of set-2
// rows, narrower for longer features, are few. Measured on the VM of bench/RESULTS.md: there it is
// 1.1-1.7x the BLAS tiles; beyond, the BLAS tiles are as fast or faster (512 x 512 tokens at 1024
// features: ~150 vs ~158 GFLOP/s per core; 256 x 256 at 4096: 0.83 vs 0.90x the reference).
// Both sets also need >= kPairMicroMinRows tokens: the kernel lists its rows (24 bytes each), which
// would otherwise outweigh a thin Gram (e.g. 65536 x 1 tokens).
constexpr int64_t kPairMicroMinD = 512, kPairMicroMinRows = 48;
constexpr double kPairMicroMaxCells = 256 * 256, kPairMicroMaxMacs = double(1 << 28);

struct GramRows {
  std::vector<const float*> a, g;
  std::vector<int64_t> sample;  // -1 for padding (only ever at the end)
  int64_t n = 0;

  GramRows(const View3& va, const View3& vg, const MaskView& mask, int pad) {
    for (int64_t b = 0; b < va.B; ++b)
      for (int64_t t = 0; t < va.T; ++t)
        if (mask.active(b, t)) {
          a.push_back(static_cast<const float*>(va.ptr) + b * va.sb + t * va.st);
          g.push_back(static_cast<const float*>(vg.ptr) + b * vg.sb + t * vg.st);
          sample.push_back(b);
        }
    while (!a.empty() && a.size() % pad != 0) {
      a.push_back(a.back());
      g.push_back(g.back());
      sample.push_back(-1);
    }
    n = static_cast<int64_t>(a.size());
  }

  // Samples of rows [lo, hi): the first, and one past the last real one.
  int64_t first(int64_t lo) const { return sample[lo]; }
  int64_t end(int64_t lo, int64_t hi) const {
    for (int64_t q = hi - 1; q >= lo; --q)
      if (sample[q] >= 0) return sample[q] + 1;
    return sample[lo] + 1;
  }
};

// Block sizes from the (padded) active row counts only: nb = kPairMicroCols set-2 rows (fewer when
// there are fewer); rc = a multiple of 6, at most kPairMicroRows, small enough for >= kPairMicroItems
// items where the rows allow, and for a thread's two buffers to hold at most 1/8 of the n1 x n2 Gram
// (as the BLAS tiles, pair_tiles) or kPairMicroFloor elements, whichever is more, but at least 6.
// (The floor keeps more than one 6-row group per pass over a block for small Grams with long
// features: e.g. 128 x 128 tokens at 4096 features, 0.94x the reference with it, 0.69x without.)
constexpr int64_t kPairMicroFloor = 16384;  // 64 KiB of float32 per thread

void pair_micro_blocks(int64_t n1, int64_t n2, int64_t D, int64_t* rc, int64_t* nb) {
  *nb = std::min(n2, std::clamp<int64_t>(kPairMicroBlockBytes / (4 * D) / kGC * kGC, kGC, kPairMicroCols));
  const int64_t ncb = divup(n2, *nb);
  const int64_t by_items = divup(n1, std::max<int64_t>(1, divup(kPairMicroItems, ncb)));
  const int64_t by_memory = std::max(n1 * n2 / 8, kPairMicroFloor) / (2 * *nb);
  *rc = std::clamp<int64_t>(std::min(divup(by_items, kGR), by_memory / kGR) * kGR, kGR, kPairMicroRows);
}

// buf[q * ld + c] += x_q . y_c over the features [0, D) for rows q < nr (a multiple of 6), c < nc.
void gram_block(const float* const* x, const float* const* y, int64_t nr, int64_t nc, int64_t D, float* buf,
                int64_t ld) {
  const int64_t nk = divup(D, kGramK), kc = divup(divup(D, nk), 16) * 16;  // even chunks of 16s
  for (int64_t k0 = 0; k0 < D; k0 += kc)
    for (int64_t q = 0; q < nr; q += kGR)
      for (int64_t c = 0; c < nc; c += kGC) gram_tile(x + q, y + c, k0, std::min(kc, D - k0), buf + q * ld + c, ld);
}

// The work items of the micro and AMX kernels: item it = (column block it / nrb of nb set-2 rows, row
// block it % nrb of rc set-1 rows). Item it touches samples [i0, i1) x [j0, j1) only: it sums
// ga * gg of its Gram block per (sample i, sample j) into its own partial sums, which sum() adds in
// item order, so results do not depend on the number of threads.
struct PairItems {
  const GramRows& r1;
  const GramRows& r2;
  int64_t rc, nb, nrb, items;
  std::vector<int64_t> off, i0, j0, wj;
  std::vector<float> part;

  PairItems(const GramRows& rows1, const GramRows& rows2, int64_t rc_, int64_t nb_)
      : r1(rows1), r2(rows2), rc(rc_), nb(nb_), nrb(divup(rows1.n, rc_)), items(divup(rows2.n, nb_) * nrb) {
    off.assign(items + 1, 0);
    i0.resize(items), j0.resize(items), wj.resize(items);
    for (int64_t it = 0; it < items; ++it) {
      i0[it] = r1.first(q0(it));
      j0[it] = r2.first(c0(it));
      wj[it] = r2.end(c0(it), c0(it) + nc(it)) - j0[it];
      off[it + 1] = off[it] + (r1.end(q0(it), q0(it) + nr(it)) - i0[it]) * wj[it];
    }
    part.assign(off[items], 0.f);
  }
  int64_t q0(int64_t it) const { return (it % nrb) * rc; }
  int64_t c0(int64_t it) const { return (it / nrb) * nb; }
  int64_t nr(int64_t it) const { return std::min(rc, r1.n - q0(it)); }
  int64_t nc(int64_t it) const { return std::min(nb, r2.n - c0(it)); }

  // The item's block: ga, gg (nr x nc, row stride ld).
  void add(int64_t it, const float* ga, const float* gg, int64_t ld) {
    const int64_t q0_ = q0(it), c0_ = c0(it), nr_ = nr(it), nc_ = nc(it);
    float* acc = part.data() + off[it];
    for (int64_t q = 0; q < nr_; ++q) {
      const int64_t i = r1.sample[q0_ + q];
      if (i < 0) break;
      float* row = acc + (i - i0[it]) * wj[it] - j0[it];
      const float* pa = ga + q * ld;
      const float* pg = gg + q * ld;
      for (int64_t c = 0; c < nc_;) {  // runs of one sample j, each summed, then added
        const int64_t j = r2.sample[c0_ + c];
        if (j < 0) break;
        int64_t e = c;
        while (e < nc_ && r2.sample[c0_ + e] == j) ++e;
        float x = 0;
#pragma omp simd reduction(+ : x)
        for (int64_t k = c; k < e; ++k) x += pa[k] * pg[k];
        row[j] += x;
        c = e;
      }
    }
  }

  at::Tensor sum(int64_t B1, int64_t B2) const {
    at::Tensor out = at::zeros({B1, B2}, at::TensorOptions().dtype(at::kFloat));
    float* po = out.data_ptr<float>();
    for (int64_t it = 0; it < items; ++it) {
      const float* acc = part.data() + off[it];
      const int64_t ni = wj[it] > 0 ? (off[it + 1] - off[it]) / wj[it] : 0;
      for (int64_t x = 0; x < ni; ++x)
        for (int64_t y = 0; y < wj[it]; ++y) po[(i0[it] + x) * B2 + j0[it] + y] += acc[x * wj[it] + y];
    }
    return out;
  }
};

at::Tensor ghost_pairwise_micro(const View3& a1, const View3& g1, const View3& a2, const View3& g2,
                                const MaskView& m1, const MaskView& m2) {
  const GramRows r1(a1, g1, m1, kGR), r2(a2, g2, m2, kGC);
  if (r1.n == 0 || r2.n == 0) return at::zeros({a1.B, a2.B}, at::TensorOptions().dtype(at::kFloat));
  int64_t rc = 0, nb = 0;
  pair_micro_blocks(r1.n, r2.n, a1.D + g1.D, &rc, &nb);
  PairItems work(r1, r2, rc, nb);
  at::parallel_for(0, work.items, 1, [&](int64_t lo, int64_t hi) {
    Scratch<float> sa, sg;
    float* ga = sa.get(rc * nb);
    float* gg = sg.get(rc * nb);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t q0 = work.q0(it), c0 = work.c0(it), nr = work.nr(it), nc = work.nc(it);
      std::fill(ga, ga + nr * nb, 0.f);
      std::fill(gg, gg + nr * nb, 0.f);
      gram_block(r1.a.data() + q0, r2.a.data() + c0, nr, nc, a1.D, ga, nb);
      gram_block(r1.g.data() + q0, r2.g.data() + c0, nr, nc, g1.D, gg, nb);
      work.add(it, ga, gg, nb);
    }
  });
  return work.sum(a1.B, a2.B);
}

// ---------------------------------------------------------------- ghost pairwise, AMX kernel
#if GEFX_AMX

// The same sum with the AMX Gram blocks of amx.h (float32 to float32 accuracy on the bf16 tile unit):
// both sets' active rows padded to multiples of 32; an item is a Gram block of rc set-1 rows x nb
// set-2 rows (pair_amx_blocks), computed for a, then for g, into two float32 buffers, then reduced
// as the micro kernel's (PairItems). A thread's scratch: the two buffers (8 rc nb bytes) and two A
// and two B packing buffers of kc features (6 bytes a feature: three bf16 parts).
//
// Block sizes from the padded row counts only, within the memory rule of the BLAS tiles (a thread's
// scratch <= 1/8 of the n1 x n2 Gram, or kPairMicroFloor elements): the (rc, nb, kc), powers of two,
// with the cheapest packing (set 1 is packed once per column block, set 2 once per row block, at
// ~0.15 and ~0.23 ns a float from L2: weights 1 and 1.2; chunks of 32 features cost ~12% more in tile
// reloads and short packing units than 64 or 128) that leaves >= kPairMicroItems items where the rows
// allow. Measured on the VM of bench/RESULTS.md: 128 x 64 x 32 at 512 x 512 tokens (a 1 MiB Gram: 100
// KiB a thread) runs 10-15% faster than 256 x 32 x 64 and 64 x 128 x 32; 512 x 256 x 128 from 2048 x
// 2048 tokens.
constexpr int64_t kPairAmxMaxRows = 512, kPairAmxMaxCols = 256;
// Auto uses it (unless the micro kernel's rule holds) for >= kPairAmxMinD features where the blocks
// come out at least kPairAmxMinCells: there it ran 1.0-1.5x the reference, the BLAS tiles 0.9-1.0x
// (bench/RESULTS.md). Its rate against the BLAS tiles' (kPairAmxSpeedup) weighs its flops against the
// tile algorithm's: e.g. 2048 x 2048 tokens at 1024 features, 1.5-1.9x the reference against the tile
// algorithm's 1.6x.
constexpr int64_t kPairAmxMinCells = 128 * 32, kPairAmxMinD = 512;

void pair_amx_blocks(int64_t n1, int64_t n2, int64_t* rc, int64_t* nb, int64_t* kc) {
  amx_blocks(n1, n2, kPairAmxMaxRows, kPairAmxMaxCols, 8, 1.2, 4 * std::max(n1 * n2 / 8, kPairMicroFloor),
             kPairMicroItems, rc, nb, kc);
}

bool amx_pays(int64_t rows1, int64_t rows2, int64_t Da, int64_t Dg) {
  int64_t rc = 0, nb = 0, kc = 0;
  pair_amx_blocks(divup(rows1, kAmxBlock) * kAmxBlock, divup(rows2, kAmxBlock) * kAmxBlock, &rc, &nb, &kc);
  return std::min(Da, Dg) >= kPairAmxMinD && rc * nb >= kPairAmxMinCells;
}

at::Tensor ghost_pairwise_amx(const View3& a1, const View3& g1, const View3& a2, const View3& g2,
                              const MaskView& m1, const MaskView& m2) {
  const GramRows r1(a1, g1, m1, kAmxBlock), r2(a2, g2, m2, kAmxBlock);
  if (r1.n == 0 || r2.n == 0) return at::zeros({a1.B, a2.B}, at::TensorOptions().dtype(at::kFloat));
  int64_t rc = 0, nb = 0, kc = 0;
  pair_amx_blocks(r1.n, r2.n, &rc, &nb, &kc);
  PairItems work(r1, r2, rc, nb);
  at::parallel_for(0, work.items, 1, [&](int64_t lo, int64_t hi) {
    AmxScratch scratch(2 * rc * nb, nb, kc);
    float* ga = scratch.floats;
    float* gg = ga + rc * nb;
    AmxTiles tiles;
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t q0 = work.q0(it), c0 = work.c0(it), nr = work.nr(it), nc = work.nc(it);
      amx_gram(r1.a.data() + q0, AmxCols{r2.a.data() + c0}, nr, nc, a1.D, kc, ga, nb, scratch.ab, scratch.bb);
      amx_gram(r1.g.data() + q0, AmxCols{r2.g.data() + c0}, nr, nc, g1.D, kc, gg, nb, scratch.ab, scratch.bb);
      work.add(it, ga, gg, nb);
    }
  });
  return work.sum(a1.B, a2.B);
}

#endif  // GEFX_AMX

#endif  // GEFX_MICRO_AVX512

// Block [o0, o0+bo) x [i0, i0+bi) of G_b^T A_b (masked tokens dropped) into w (bo x bi, contiguous).
template <typename acc_t>
void weight_block(const View3& a, const View3& g, const MaskView& m, int64_t b, int64_t o0, int64_t bo,
                  int64_t i0, int64_t bi, acc_t* w, std::vector<acc_t>& ba, std::vector<acc_t>& bg) {
  bool first = true;
  for (int64_t t0 = 0; t0 < a.T; t0 += kTokChunk) {
    const int64_t nt = std::min(kTokChunk, a.T - t0);
    at::Tensor Gt = rows_matrix<acc_t>(g, b * g.T + t0, nt, o0, bo, bg);
    at::Tensor At = rows_matrix<acc_t>(a, b * a.T + t0, nt, i0, bi, ba, &m);
    // w = Gt^T At (+ w)
    gemm<acc_t>(true, false, bo, bi, nt, Gt.data_ptr<acc_t>(), ld_of(Gt), At.data_ptr<acc_t>(), ld_of(At),
                first ? acc_t(0) : acc_t(1), w, bi);
    first = false;
  }
  if (first) std::fill(w, w + bo * bi, acc_t(0));
}

// Tile algorithm for pairs (self == true: a2/g2 are a1/g1 and only the diagonal is wanted).
// Returns [B1, B2] (or [B1] for self).
template <typename acc_t>
at::Tensor tile_algo(const View3& a1, const View3& g1, const MaskView& m1, const View3& a2, const View3& g2,
                     const MaskView& m2, bool self) {
  const int64_t B1 = a1.B, B2 = self ? 1 : a2.B, Da = a1.D, Dg = g1.D;
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  const int64_t WB = weight_block_side(B1, a1.T, self ? 0 : a2.B, a2.T, Da, Dg, self);
  const int64_t WO = WB, WI = WB;
  const int64_t nob = divup(Dg, WO), nib = divup(Da, WI), nb = nob * nib;
  // Fixed block groups (independent of the thread count) -> deterministic sums.
  const int64_t per = std::max<int64_t>(1, B1 * B2);
  const int64_t ng = std::max<int64_t>(1, std::min<int64_t>({nb, 32, std::max<int64_t>(1, (int64_t(1) << 24) / per)}));
  at::Tensor part = at::zeros({ng, B1, B2}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, ng, 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    SerialBlas serial;
    std::vector<acc_t> ba, bg;
    Scratch<acc_t> sw1, sw2, sp;
    for (int64_t grp = lo; grp < hi; ++grp) {
      acc_t* acc = pp + grp * B1 * B2;
      for (int64_t blk = grp * nb / ng; blk < (grp + 1) * nb / ng; ++blk) {
        const int64_t o0 = (blk / nib) * WO, i0 = (blk % nib) * WI;
        const int64_t bo = std::min(WO, Dg - o0), bi = std::min(WI, Da - i0), bs = bo * bi;
        for (int64_t s1 = 0; s1 < B1; s1 += kSampleChunk) {
          const int64_t c1 = std::min(kSampleChunk, B1 - s1);
          acc_t* w1 = sw1.get(c1 * bs);
          for (int64_t k = 0; k < c1; ++k) weight_block<acc_t>(a1, g1, m1, s1 + k, o0, bo, i0, bi, w1 + k * bs, ba, bg);
          if (self) {
            for (int64_t k = 0; k < c1; ++k) {
              const acc_t* w = w1 + k * bs;
              acc[s1 + k] += dot(w, w, bs);
            }
            continue;
          }
          for (int64_t s2 = 0; s2 < B2; s2 += kSampleChunk) {
            const int64_t c2 = std::min(kSampleChunk, B2 - s2);
            acc_t* w2 = sw2.get(c2 * bs);
            for (int64_t k = 0; k < c2; ++k) weight_block<acc_t>(a2, g2, m2, s2 + k, o0, bo, i0, bi, w2 + k * bs, ba, bg);
            acc_t* p = sp.get(c1 * c2);
            gemm_nt<acc_t>(c1, c2, bs, w1, bs, w2, bs, p);
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
  int64_t h = 0, cmax = 0;
  self_tiles(B, T, &h, &cmax);
  const int64_t ns = divup(T, h);
  at::Tensor part = at::zeros({B, ns}, opts);
  acc_t* pp = part.data_ptr<acc_t>();
  at::parallel_for(0, B * ns, 1, [&](int64_t lo, int64_t hi) {
    c10::InferenceMode guard;
    SerialBlas serial;
    std::vector<acc_t> bap, bgp, baq, bgq, wp, wq;
    Scratch<acc_t> sa, sg;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / ns, r0 = (item % ns) * h, hh = std::min(h, T - r0);
      if (row_weights(m, T, b * T + r0, hh, wp) == 0) continue;
      at::Tensor Ap = rows_matrix<acc_t>(a, b * T + r0, hh, 0, a.D, bap);
      at::Tensor Gp = rows_matrix<acc_t>(g, b * T + r0, hh, 0, g.D, bgp);
      acc_t tot = 0;
      // Columns c >= r0 of the strip's rows, in chunks of at most cmax; the product tile is stored
      // column-major (one row of cmax x hh per column token): the strip is the GEMM's short side.
      for (int64_t c0 = r0; c0 < T; c0 += cmax) {
        const int64_t nc = std::min(cmax, T - c0);
        if (row_weights(m, T, b * T + c0, nc, wq) == 0) continue;
        at::Tensor Aq = rows_matrix<acc_t>(a, b * T + c0, nc, 0, a.D, baq);
        at::Tensor Gq = rows_matrix<acc_t>(g, b * T + c0, nc, 0, g.D, bgq);
        acc_t* ca = sa.get(nc * hh);
        acc_t* cg = sg.get(nc * hh);
        gemm_nt<acc_t>(nc, hh, a.D, Aq.data_ptr<acc_t>(), ld_of(Aq), Ap.data_ptr<acc_t>(), ld_of(Ap), ca);
        gemm_nt<acc_t>(nc, hh, g.D, Gq.data_ptr<acc_t>(), ld_of(Gq), Gp.data_ptr<acc_t>(), ld_of(Gp), cg);
        acc_t sd = 0, so = 0;  // inside the strip's own (symmetric) square block: once; beyond it: twice
        const acc_t* w = wp.data();
        for (int64_t c = 0; c < nc; ++c) {
          if (wq[c] == acc_t(0)) continue;
          const acc_t* xa = ca + c * hh;
          const acc_t* xg = cg + c * hh;
          acc_t x = 0;
#pragma omp simd reduction(+ : x)
          for (int64_t r = 0; r < hh; ++r) x += w[r] * xa[r] * xg[r];
          if (c0 + c < r0 + hh) {
            sd += x;
          } else {
            so += x;
          }
        }
        tot += sd + 2 * so;
      }
      pp[item] = tot;
    }
  });
  return part.sum(1);
}

// Flops (multiply-adds) of each algorithm, the tile one weighted by its block size's GEMM rate; the
// ghost algorithm's count 1 / kPairAmxSpeedup where the AMX kernel runs it (its rate against the
// BLAS tiles', see amx_pays).
constexpr double kPairAmxSpeedup = 2.0;

double ghost_pair_cost(int64_t B1, int64_t T1, int64_t B2, int64_t T2, int64_t Da, int64_t Dg) {
  return double(B1) * B2 * T1 * T2 * (Da + Dg);
}

double tile_pair_cost(int64_t B1, int64_t T1, int64_t B2, int64_t T2, int64_t Da, int64_t Dg) {
  const double chunks1 = double(divup(std::max<int64_t>(B1, 1), kSampleChunk));
  const double f = wblock_factor(weight_block_side(B1, T1, B2, T2, Da, Dg, false));
  return f * (double(B1) * T1 + chunks1 * B2 * T2 + double(B1) * B2) * Da * Dg;
}

double ghost_self_cost(int64_t B, int64_t T, int64_t Da, int64_t Dg) {
  int64_t h = 0, cmax = 0;
  self_tiles(B, T, &h, &cmax);
  // strips of h rows against the columns from their first row on: about (T^2 + T h) / 2 products
  return double(B) * (double(T) * T + double(T) * std::min(h, T)) / 2.0 * (Da + Dg);
}

double tile_self_cost(int64_t B, int64_t T, int64_t Da, int64_t Dg) {
  return wblock_factor(weight_block_side(B, T, 0, T, Da, Dg, true)) * double(B) * (T + 1) * Da * Dg;
}


}  // namespace

at::Tensor ghost_pairwise(const at::Tensor& a1, const at::Tensor& g1, const at::Tensor& a2, const at::Tensor& g2,
                          const std::optional<at::Tensor>& mask1, const std::optional<at::Tensor>& mask2,
                          int64_t algo, int64_t kernel) {
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
  TORCH_CHECK(kernel >= 0 && kernel <= 3,
              "gefx._C: ghost_pairwise kernel must be 0 (auto), 1 (blas), 2 (micro) or 3 (amx), got ", kernel);
  const at::ScalarType acc = acc_type_of({&a1, &g1, &a2, &g2});
  const int64_t B1 = a1.size(0), T1 = a1.size(1), B2 = a2.size(0), T2 = a2.size(1);
  if (B1 == 0 || B2 == 0 || T1 == 0 || T2 == 0 || a1.size(2) == 0 || g1.size(2) == 0)
    return at::zeros({B1, B2}, at::TensorOptions().dtype(acc));
  const MaskView m1 = mask_view(mask1, B1, T1, "mask1"), m2 = mask_view(mask2, B2, T2, "mask2");
  const View3 va1 = view3(a1), vg1 = view3(g1), va2 = view3(a2), vg2 = view3(g2);
  const int64_t Da = a1.size(2), Dg = g1.size(2);
  const bool micro = micro_eligible(va1, vg1, acc) && micro_eligible(va2, vg2, acc);
  const bool amx = micro && amx_available();
  TORCH_CHECK(kernel != 2 || (micro && algo != 2),
              "gefx._C: the ghost_pairwise micro kernel needs the ghost algorithm and float32 a and g with "
              "unit feature stride on a CPU with AVX-512 (",
              algo == 2 ? "algo 2 asks for the tile algorithm" : micro_available() ? "the inputs are not" : "this CPU has none",
              ")");
  TORCH_CHECK(kernel != 3 || (amx && algo != 2),
              "gefx._C: the ghost_pairwise amx kernel needs the ghost algorithm and float32 a and g with unit "
              "feature stride on a CPU with AMX bf16 tiles (",
              algo == 2 ? "algo 2 asks for the tile algorithm"
              : !amx_available() ? (GEFX_AMX ? "this CPU or OS has none" : "this build has no AMX code")
                                 : "the inputs are not",
              ")");
  // Auto (kernel 0, float32): the micro kernel for small Grams of long features (micro_pays), else the
  // AMX kernel where its blocks come out large enough (amx_pays; its ghost flops then count
  // 1 / kPairAmxSpeedup against the tile algorithm's), else BLAS Gram tiles.
  [[maybe_unused]] bool micro_auto = false, amx_auto = false;
#if GEFX_MICRO_AVX512
  const double cells = double(B1) * T1 * B2 * T2;
  micro_auto = micro && kernel == 0 && std::min(Da, Dg) >= kPairMicroMinD &&
               std::min(B1 * T1, B2 * T2) >= kPairMicroMinRows && cells <= kPairMicroMaxCells &&
               cells * double(Da + Dg) <= kPairMicroMaxMacs;
#if GEFX_AMX
  amx_auto = amx && kernel == 0 && !micro_auto && amx_pays(B1 * T1, B2 * T2, Da, Dg);
#endif
#endif
  const double ghost_cost = ghost_pair_cost(B1, T1, B2, T2, Da, Dg) / (amx_auto ? kPairAmxSpeedup : 1.0);
  const bool tile = algo == 2 || (algo == 0 && kernel < 2 && tile_pair_cost(B1, T1, B2, T2, Da, Dg) < ghost_cost);
#if GEFX_MICRO_AVX512
  if (!tile && (kernel == 2 || micro_auto)) return ghost_pairwise_micro(va1, vg1, va2, vg2, m1, m2);
#if GEFX_AMX
  if (!tile && (kernel == 3 || amx_auto)) return ghost_pairwise_amx(va1, vg1, va2, vg2, m1, m2);
#endif
#endif
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

}  // namespace gefx
