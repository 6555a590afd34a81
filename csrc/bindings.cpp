// Python bindings of gefx._C (pybind11 through torch's extension headers).
#include <torch/extension.h>

#include "gefx_ops.h"
#include "cpu/common.h"
#include "cpu/amx.h"
#include "cpu/micro.h"

#ifdef GEFX_WITH_CUDA
namespace gefx {
void register_cuda(pybind11::module_& m);  // csrc/cuda/ (built only with GEFX_BUILD_CUDA=1)
}
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gefx._C: fused CPU kernels of the gefx engine ops (see gefx/reference.py for the math)";
  m.def("ghost_pairwise", &gefx::ghost_pairwise, "M[i,j] = <G1_i^T A1_i, G2_j^T A2_j> -> [B1, B2]",
        py::arg("a1"), py::arg("g1"), py::arg("a2"), py::arg("g2"), py::arg("mask1") = py::none(),
        py::arg("mask2") = py::none(), py::arg("algo") = 0, py::arg("kernel") = 0);
  m.def("ghost_self", &gefx::ghost_self, "v[i] = ||G_i^T A_i||^2 -> [B]", py::arg("a"), py::arg("g"),
        py::arg("mask") = py::none(), py::arg("algo") = 0);
  m.def("dense_dot", &gefx::dense_dot, "v[i] = sum_t g_it^T M a_it -> [B]", py::arg("a"), py::arg("g"), py::arg("m"),
        py::arg("mask") = py::none(), py::arg("kernel") = 0);
  m.def("embedding_pairwise", &gefx::embedding_pairwise, "embedding-table gradient inner products -> [B1, B2]",
        py::arg("ids1"), py::arg("g1"), py::arg("ids2"), py::arg("g2"), py::arg("mask1") = py::none(),
        py::arg("mask2") = py::none());
  m.def("embedding_self", &gefx::embedding_self, "embedding-table gradient squared norms -> [B]", py::arg("ids"),
        py::arg("g"), py::arg("mask") = py::none());
  m.def("embedding_dense_dot", &gefx::embedding_dense_dot, "v[i] = sum_t M[id_it] . g_it -> [B]", py::arg("ids"),
        py::arg("g"), py::arg("m"), py::arg("mask") = py::none());
  m.def("norm_grad", &gefx::norm_grad, "sum_t u_it * g_it -> [B, D]", py::arg("u"), py::arg("g"),
        py::arg("mask") = py::none());
  m.def("build_info", []() {
    py::dict d;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef GEFX_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["pair_tile"] = std::to_string(gefx::cpu::kPairLong) + "x" + std::to_string(gefx::cpu::kPairShort) + ".." +
                     std::to_string(gefx::cpu::kPairShortMax);
    d["weight_block_max"] = gefx::cpu::kWBlockLarge;
    d["dense_tile_max"] = std::to_string(gefx::cpu::kDenseMaxRows) + "x" + std::to_string(gefx::cpu::kDenseMaxOut);
    d["micro_avx512"] = gefx::cpu::micro_available();
    d["amx"] = gefx::cpu::amx_available();
#if GEFX_DIRECT_BLAS
    d["direct_blas"] = sgemm_ != nullptr && dgemm_ != nullptr;
#else
    d["direct_blas"] = false;
#endif
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR)
    d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#endif
    return d;
  });
#ifdef GEFX_WITH_CUDA
  gefx::register_cuda(m);
#endif
}
