// Python binding of the fused CPU kernel (csrc/gq_search_cpu_kernel.h).
// Only light torch headers (ATen Tensor + pybind casters, not torch/extension.h) to keep the
// JIT build short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "gq_search_cpu_kernel.h"

namespace {

at::Tensor argmax_ip(at::Tensor W, at::Tensor F, int64_t n_threads) {
  TORCH_CHECK(W.device().is_cpu() && F.device().is_cpu(), "gq cpp kernel: tensors must be on the CPU");
  TORCH_CHECK(W.scalar_type() == at::kFloat && F.scalar_type() == at::kFloat,
              "gq cpp kernel: W and F must be float32");
  TORCH_CHECK(W.dim() == 2 && F.dim() == 2 && W.size(1) == F.size(1), "gq cpp kernel: W (N, D) and F (K, D)");
  TORCH_CHECK(F.size(0) >= 1, "gq cpp kernel: F must have at least one row");
  TORCH_CHECK(F.size(0) < (int64_t(1) << 31) - gq_cpu::NR, "gq cpp kernel: K too large");
  W = W.contiguous();
  F = F.contiguous();
  const int64_t N = W.size(0);
  const int32_t K = static_cast<int32_t>(F.size(0));
  const int D = static_cast<int>(W.size(1));
  auto out = at::empty({N}, at::TensorOptions().dtype(at::kLong));
  if (N == 0) return out;
#ifdef _OPENMP
  if (n_threads > 0) omp_set_num_threads(static_cast<int>(n_threads));
#endif
  const float* w = W.data_ptr<float>();
  const float* f = F.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  {
    pybind11::gil_scoped_release no_gil;
    gq_cpu::argmax_ip(w, f, N, K, D, o);
  }
  return out;
}

int simd_width() { return gq_cpu::VL; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_ip", &argmax_ip, "index[n] = argmax_k W[n].F[k] (float32, smallest k on ties)", pybind11::arg("W"),
        pybind11::arg("F"), pybind11::arg("n_threads") = 0);
  m.def("simd_width", &simd_width, "floats per SIMD vector the kernel was compiled for");
}
