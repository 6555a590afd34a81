// gefx._C: declarations of the CPU ops (same names and argument order as gefx/reference.py).
// Every op takes tensors in their storage dtype (float64/32/16, bfloat16), any strides, optional
// bool masks [B, T], and returns float32 (float64 when an input is float64).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace gefx {

// algo: 0 = choose by counting flops, 1 = ghost (token Gram tiles), 2 = per-sample weight-gradient
// tiles (a fixed-size block of G_i^T A_i per sample, never the whole matrix).
// kernel (ghost algorithm): 0 = auto, 1 = BLAS Gram tiles, 2 = the AVX-512 dot-form micro kernel,
// 3 = AMX bf16 tiles at float32 accuracy (2 and 3: float32 inputs with unit feature stride on a CPU
// that has them; an error where they do not apply).
at::Tensor ghost_pairwise(const at::Tensor& a1, const at::Tensor& g1, const at::Tensor& a2,
                          const at::Tensor& g2, const std::optional<at::Tensor>& mask1,
                          const std::optional<at::Tensor>& mask2, int64_t algo, int64_t kernel);
at::Tensor ghost_self(const at::Tensor& a, const at::Tensor& g, const std::optional<at::Tensor>& mask,
                      int64_t algo);
// kernel: 0 = auto, 1 = BLAS product tiles, 2 = the AVX-512 micro kernel, 3 = AMX bf16 tiles at
// float32 accuracy (2 and 3: float32 a and g with unit feature stride on a CPU that has them; an
// error where they do not apply).
at::Tensor dense_dot(const at::Tensor& a, const at::Tensor& g, const at::Tensor& m,
                     const std::optional<at::Tensor>& mask, int64_t kernel);
at::Tensor embedding_pairwise(const at::Tensor& ids1, const at::Tensor& g1, const at::Tensor& ids2,
                              const at::Tensor& g2, const std::optional<at::Tensor>& mask1,
                              const std::optional<at::Tensor>& mask2);
at::Tensor embedding_self(const at::Tensor& ids, const at::Tensor& g, const std::optional<at::Tensor>& mask);
at::Tensor embedding_dense_dot(const at::Tensor& ids, const at::Tensor& g, const at::Tensor& m,
                               const std::optional<at::Tensor>& mask);
at::Tensor norm_grad(const at::Tensor& u, const at::Tensor& g, const std::optional<at::Tensor>& mask);

}  // namespace gefx
