// Optional CUDA ops of gefx._C, compiled only with GEFX_BUILD_CUDA=1 against a CUDA build of torch.
// NOT YET TESTED ON A GPU (off by default). The GPU path of gefx is the Triton backend; these are
// a simple kernel for the memory-bound norm_grad op, exposed as _C.cuda_norm_grad; gefx._cext does
// not route CUDA tensors to it (they go to Triton or the reference) until it is tested on a GPU.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace gefx {
namespace {

template <typename acc_t, typename u_t, typename g_t>
__global__ void norm_grad_kernel(const u_t* __restrict__ u, const g_t* __restrict__ g, const bool* __restrict__ mask,
                                 acc_t* __restrict__ out, int64_t T, int64_t D, int64_t usb, int64_t ust, int64_t usd,
                                 int64_t gsb, int64_t gst, int64_t gsd, int64_t ms0, int64_t ms1) {
  const int64_t b = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  acc_t acc = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (mask != nullptr && !mask[b * ms0 + t * ms1]) continue;
    acc += static_cast<acc_t>(static_cast<float>(u[b * usb + t * ust + d * usd])) *
           static_cast<acc_t>(static_cast<float>(g[b * gsb + t * gst + d * gsd]));
  }
  out[b * D + d] = acc;
}

at::Tensor cuda_norm_grad(const at::Tensor& u, const at::Tensor& g, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(u.is_cuda() && g.is_cuda(), "gefx._C.cuda_norm_grad: u and g must be CUDA tensors");
  TORCH_CHECK(u.dim() == 3 && u.sizes() == g.sizes(), "gefx._C.cuda_norm_grad: u and g must be [B, T, D] alike");
  TORCH_CHECK(u.scalar_type() == g.scalar_type(), "gefx._C.cuda_norm_grad: u and g must share a dtype");
  const bool dbl = u.scalar_type() == at::kDouble;
  c10::cuda::CUDAGuard guard(u.device());
  const int64_t B = u.size(0), T = u.size(1), D = u.size(2);
  at::Tensor out = at::zeros({B, D}, u.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (B == 0 || D == 0) return out;
  const bool* mp = nullptr;
  int64_t ms0 = 0, ms1 = 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->is_cuda() && mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B &&
                    mask->size(1) == T,
                "gefx._C.cuda_norm_grad: mask must be a bool CUDA tensor [B, T]");
    mp = mask->data_ptr<bool>();
    ms0 = mask->stride(0);
    ms1 = mask->stride(1);
  }
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((D + threads - 1) / threads), static_cast<unsigned>(B));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "gefx_cuda_norm_grad", [&] {
    if (dbl) {
      norm_grad_kernel<double, scalar_t, scalar_t><<<grid, threads, 0, stream>>>(
          u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), mp, out.data_ptr<double>(), T, D, u.stride(0), u.stride(1),
          u.stride(2), g.stride(0), g.stride(1), g.stride(2), ms0, ms1);
    } else {
      norm_grad_kernel<float, scalar_t, scalar_t><<<grid, threads, 0, stream>>>(
          u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), mp, out.data_ptr<float>(), T, D, u.stride(0), u.stride(1),
          u.stride(2), g.stride(0), g.stride(1), g.stride(2), ms0, ms1);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

void register_cuda(pybind11::module_& m) {
  m.def("cuda_norm_grad", &cuda_norm_grad, "norm_grad on CUDA tensors (untested; GEFX_BUILD_CUDA=1)",
        pybind11::arg("u"), pybind11::arg("g"), pybind11::arg("mask") = pybind11::none());
}

}  // namespace gefx
