// Shared helpers of the CPU ops: strided views of the inputs, convert-on-load row packing,
// argument checks and the tile sizes. Header-only, internal to gefx._C.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// BLAS entry points of the library torch links (MKL here: statically inside libtorch_cpu, exported).
// Declared weak so that the extension still loads where torch exports none of them (another BLAS, or
// none): gemm() then goes through at::mm_out / addmm_. ELF platforms only; elsewhere, or built with
// -DGEFX_NO_DIRECT_BLAS (e.g. CFLAGS=-DGEFX_NO_DIRECT_BLAS, to test that path), always at::mm_out.
#if defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && !defined(GEFX_NO_DIRECT_BLAS)
#define GEFX_DIRECT_BLAS 1
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // mkl_service.h: the C entry point
}
#else
#define GEFX_DIRECT_BLAS 0
#endif

namespace gefx {
namespace cpu {

// Tile sizes. The rules that choose among them (by the problem's shape, never by the thread count)
// are in ghost.cpp next to their ops; the extra memory of every op is O(threads * tile), at most a
// fixed fraction of the reference's for small problems and bounded by these maxima for large ones.
constexpr int64_t kPairLong = 512, kPairShort = 32;   // ghost pairwise Gram tile: long x short token rows
constexpr int64_t kPairShortMax = 256;                // ... the short side grown up to this on large Grams
constexpr int64_t kSelfStrip = 32, kSelfCols = 512;   // self norms: strip tokens x column tokens per product
constexpr int64_t kWBlockLarge = 256, kWBlock = 128, kWBlockMin = 64;  // tile algorithm: weight-block sides
constexpr int64_t kWBlockMaxElems = int64_t(2) << 20;  // tile algorithm: a thread's blocks (8 MiB fp32)
constexpr int64_t kTokChunk = 512;                    // tile algorithm: tokens per block GEMM
constexpr int64_t kSampleChunk = 16;                  // tile algorithm: samples whose blocks are held at once
constexpr int64_t kDenseMaxRows = 512, kDenseMaxOut = 256;  // dense_dot: largest R x O product tile
constexpr int64_t kDenseItems = 16;  // dense_dot: work items wanted (row blocks x column-block groups)

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// While alive, BLAS calls made by this thread run single-threaded (MKL's thread-local setting; a no-op
// with another BLAS, whose calls inside an OpenMP parallel region are single-threaded anyway). Every
// GEMM of these kernels runs on one tile inside at::parallel_for, also when the loop runs inline on
// the calling thread, so results do not depend on how many threads BLAS would otherwise use.
struct SerialBlas {
#if GEFX_DIRECT_BLAS
  int prev = -1;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr && prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
#else
  SerialBlas() = default;
#endif
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};

// Row-major GEMM on raw pointers: C[m, n] = op(A) op(B) + beta C, op(X) = X^T where the flag says so;
// every matrix has unit column stride and a leading dimension (row stride) of at least its column
// count. A direct BLAS call when torch's library exports one (no tensor or dispatcher overhead per
// tile, which counts for small tiles), else at::mm_out / addmm_. beta is 0 or 1.
template <typename acc_t>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda, const acc_t* B,
                 int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == acc_t(0))
      for (int64_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, acc_t(0));
    return;
  }
#if GEFX_DIRECT_BLAS
  // Column-major view of the same memory: C^T [n, m] = op(B)^T op(A)^T.
  if (std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ila = static_cast<int>(ldb), ilb = static_cast<int>(lda), ilc = static_cast<int>(ldc);
    const acc_t one = 1;
    if constexpr (std::is_same<acc_t, float>::value) {
      if (sgemm_ != nullptr) {
        sgemm_(&ca, &cb, &im, &in, &ik, &one, B, &ila, A, &ilb, &beta, C, &ilc);
        return;
      }
    } else {
      if (dgemm_ != nullptr) {
        dgemm_(&ca, &cb, &im, &in, &ik, &one, B, &ila, A, &ilb, &beta, C, &ilc);
        return;
      }
    }
  }
#endif
  const auto opts = at::TensorOptions().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
  at::Tensor Ct = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  at::Tensor At = ta ? at::from_blob(const_cast<acc_t*>(A), {k, m}, {lda, 1}, opts).t()
                     : at::from_blob(const_cast<acc_t*>(A), {m, k}, {lda, 1}, opts);
  at::Tensor Bt = tb ? at::from_blob(const_cast<acc_t*>(B), {n, k}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<acc_t*>(B), {k, n}, {ldb, 1}, opts);
  if (beta == acc_t(0)) {
    at::mm_out(Ct, At, Bt);
  } else {
    Ct.addmm_(At, Bt);
  }
}

// C[m, n] (contiguous) = A[m, k] B[n, k]^T: the Gram / product tiles.
template <typename acc_t>
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                    acc_t* C) {
  gemm<acc_t>(false, true, m, n, k, A, lda, B, ldb, acc_t(0), C, n);
}

// Leading dimension of a [rows, cols] matrix from rows_matrix (unit column stride).
inline int64_t ld_of(const at::Tensor& x) { return x.size(0) <= 1 ? x.size(1) : x.stride(0); }

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A [B, T, D] tensor read through its strides (element units), any supported dtype.
struct View3 {
  const void* ptr = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t B = 0, T = 0, D = 0, sb = 0, st = 0, sd = 0;
};

inline View3 view3(const at::Tensor& x) {
  View3 v;
  v.ptr = x.data_ptr();
  v.dtype = x.scalar_type();
  v.B = x.size(0);
  v.T = x.size(1);
  v.D = x.size(2);
  v.sb = x.stride(0);
  v.st = x.stride(1);
  v.sd = x.stride(2);
  return v;
}

// A 2-D matrix [R, C] seen as [1, R, C].
inline View3 view2(const at::Tensor& x) {
  View3 v;
  v.ptr = x.data_ptr();
  v.dtype = x.scalar_type();
  v.B = 1;
  v.T = x.size(0);
  v.D = x.size(1);
  v.sb = 0;
  v.st = x.stride(0);
  v.sd = x.stride(1);
  return v;
}

// Optional bool mask [B, T]; active(b, t) is true where there is no mask.
struct MaskView {
  const bool* ptr = nullptr;
  int64_t s0 = 0, s1 = 0;
  bool active(int64_t b, int64_t t) const { return ptr == nullptr || ptr[b * s0 + t * s1]; }
};

// Token ids [B, T], int64 or int32.
struct IdView {
  const void* ptr = nullptr;
  bool is64 = true;
  int64_t s0 = 0, s1 = 0;
  int64_t at(int64_t b, int64_t t) const {
    const int64_t off = b * s0 + t * s1;
    return is64 ? static_cast<const int64_t*>(ptr)[off] : static_cast<const int32_t*>(ptr)[off];
  }
};

template <typename acc_t, typename src_t>
inline void load_row_t(const src_t* p, int64_t sd, int64_t n, acc_t* dst) {
  if (sd == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(static_cast<float>(p[k]));
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(static_cast<float>(p[k * sd]));
  }
}

template <typename acc_t>
inline void load_row_t(const double* p, int64_t sd, int64_t n, acc_t* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(p[k * sd]);
}

// dst[0:n] = x[b, t, d0:d0+n], converted to acc_t.
template <typename acc_t>
inline void load_row(const View3& x, int64_t b, int64_t t, int64_t d0, int64_t n, acc_t* dst) {
  const int64_t off = b * x.sb + t * x.st + d0 * x.sd;
  switch (x.dtype) {
    case at::kFloat:
      load_row_t<acc_t>(static_cast<const float*>(x.ptr) + off, x.sd, n, dst);
      break;
    case at::kDouble:
      load_row_t<acc_t>(static_cast<const double*>(x.ptr) + off, x.sd, n, dst);
      break;
    case at::kBFloat16:
      load_row_t<acc_t>(static_cast<const at::BFloat16*>(x.ptr) + off, x.sd, n, dst);
      break;
    case at::kHalf:
      load_row_t<acc_t>(static_cast<const at::Half*>(x.ptr) + off, x.sd, n, dst);
      break;
    default:
      TORCH_CHECK(false, "gefx._C: unsupported dtype ", x.dtype);
  }
}

template <typename acc_t>
inline at::ScalarType acc_scalar() {
  return std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
}

// A per-thread scratch buffer of acc_t, 64-byte aligned (torch's CPU allocator), grown on demand.
template <typename acc_t>
struct Scratch {
  at::Tensor buf;
  acc_t* get(int64_t n) {
    if (!buf.defined() || buf.numel() < n)
      buf = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(acc_scalar<acc_t>()));
    return buf.data_ptr<acc_t>();
  }
};

// Rows [r0, r0 + n) of x flattened to [B*T, D], columns [d0, d0 + nd), as an acc_t matrix [n, nd].
// A view of x itself when the dtype already is acc_t and the rows are evenly strided with unit
// feature stride; otherwise packed (converted) into buf, a per-thread buffer of n * nd elements.
// With zero_masked, masked tokens are packed as zero rows (the direct view is not used then).
template <typename acc_t>
inline at::Tensor rows_matrix(const View3& x, int64_t r0, int64_t n, int64_t d0, int64_t nd,
                              std::vector<acc_t>& buf, const MaskView* zero_masked = nullptr) {
  const int64_t b0 = r0 / x.T, b1 = (r0 + n - 1) / x.T;
  int64_t ld = -1;
  if (x.dtype == acc_scalar<acc_t>() && (x.sd == 1 || nd == 1) &&
      (zero_masked == nullptr || zero_masked->ptr == nullptr)) {
    if (n == 1) {
      ld = nd;
    } else if (b0 == b1) {
      ld = x.st;
    } else if (x.T == 1) {
      ld = x.sb;
    } else if (x.sb == x.T * x.st) {
      ld = x.st;
    }
    if (ld < nd) ld = -1;  // overlapping or broadcast rows: pack instead
  }
  const auto opts = at::TensorOptions().dtype(acc_scalar<acc_t>());
  if (ld > 0) {
    const acc_t* p = static_cast<const acc_t*>(x.ptr) + b0 * x.sb + (r0 - b0 * x.T) * x.st + d0 * x.sd;
    return at::from_blob(const_cast<acc_t*>(p), {n, nd}, {ld, 1}, opts);
  }
  if (static_cast<int64_t>(buf.size()) < n * nd) buf.resize(n * nd);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = (r0 + r) / x.T, t = (r0 + r) % x.T;
    acc_t* dst = buf.data() + r * nd;
    if (zero_masked != nullptr && !zero_masked->active(b, t)) {
      std::fill(dst, dst + nd, acc_t(0));
    } else {
      load_row<acc_t>(x, b, t, d0, nd, dst);
    }
  }
  return at::from_blob(buf.data(), {n, nd}, opts);
}

// Row weights (1 or 0 from the mask) of flat rows [r0, r0 + n) of a set with T tokens per sample.
template <typename acc_t>
inline int64_t row_weights(const MaskView& m, int64_t T, int64_t r0, int64_t n, std::vector<acc_t>& w) {
  w.resize(n);
  int64_t live = 0;
  for (int64_t r = 0; r < n; ++r) {
    const bool on = m.active((r0 + r) / T, (r0 + r) % T);
    w[r] = on ? acc_t(1) : acc_t(0);
    live += on;
  }
  return live;
}

// Dot product with 16 independent partial sums (vectorizable without reassociation, no single
// add-latency chain), combined in a fixed order: the result depends only on x, y and n.
template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) s[j] += x[k + j] * y[k + j];
  for (int j = 0; k < n; ++k, ++j) s[j] += x[k] * y[k];
  for (int h = 8; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) s[j] += s[j + h];
  return s[0];
}

// ---- argument checks (clear messages; the Python layer validates user input first) ----

inline void check_factor(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "gefx._C: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "gefx._C: ", name, " must be [B, T, D], got ", x.dim(), " dims");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "gefx._C: ", name,
              " must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_same_bt(const at::Tensor& x, const at::Tensor& y, const char* nx, const char* ny) {
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(1) == y.size(1), "gefx._C: ", nx, " ", x.sizes(), " and ",
              ny, " ", y.sizes(), " disagree on [B, T]");
}

inline MaskView mask_view(const std::optional<at::Tensor>& mask, int64_t B, int64_t T, const char* name) {
  MaskView m;
  if (!mask.has_value() || !mask->defined()) return m;
  const at::Tensor& x = *mask;
  TORCH_CHECK(x.device().is_cpu(), "gefx._C: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kBool, "gefx._C: ", name, " must be bool, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T, "gefx._C: ", name, " must be [B, T] = [", B,
              ", ", T, "], got ", x.sizes());
  m.ptr = x.data_ptr<bool>();
  m.s0 = x.stride(0);
  m.s1 = x.stride(1);
  return m;
}

inline IdView id_view(const at::Tensor& ids, const char* name) {
  TORCH_CHECK(ids.device().is_cpu(), "gefx._C: ", name, " must be a CPU tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "gefx._C: ", name,
              " must be int64 or int32 token ids, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, "gefx._C: ", name, " must be [B, T], got ", ids.dim(), " dims");
  IdView v;
  v.ptr = ids.data_ptr();
  v.is64 = ids.scalar_type() == at::kLong;
  v.s0 = ids.stride(0);
  v.s1 = ids.stride(1);
  return v;
}

inline bool any_double(std::initializer_list<const at::Tensor*> xs) {
  for (const at::Tensor* x : xs)
    if (x->scalar_type() == at::kDouble) return true;
  return false;
}

// The accumulation dtype of an op: float64 when any input is float64, else float32.
inline at::ScalarType acc_type_of(std::initializer_list<const at::Tensor*> xs) {
  return any_double(xs) ? at::kDouble : at::kFloat;
}

}  // namespace cpu
}  // namespace gefx
