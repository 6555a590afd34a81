// Shared helpers of the CPU ops: strided views of the inputs, convert-on-load row packing,
// argument checks and the tile sizes. Header-only, internal to gefx._C.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gefx {
namespace cpu {

// Token rows per Gram tile (rows and columns), columns of a dense-reference block, and the block of
// a per-sample weight gradient held at once. Fixed sizes: the extra memory of every op is
// O(threads * tile), whatever T, S or the feature sizes.
constexpr int64_t kRowTile = 256;
constexpr int64_t kDenseMinTile = 256 * 1024;  // dense_dot: smallest chunk of A M^T (elements, 1 MiB fp32)
constexpr int64_t kWBlock = 128;
constexpr int64_t kTokChunk = 512;
constexpr int64_t kSampleChunk = 16;
constexpr int64_t kStrip = 64;  // rows per strip of a diagonal self-norm tile

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
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

}  // namespace cpu
}  // namespace gefx
