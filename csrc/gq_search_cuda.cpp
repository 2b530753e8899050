// Torch binding of the fused CUDA kernel (csrc/gq_search_cuda_kernel.cu). Built only with a
// CUDA build of torch (gq_plugin/kernels.py, torch.utils.cpp_extension.load).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

extern "C" int gq_argmax_ip_cuda_launch(const float* W, const float* FT, int64_t N, int32_t K, int D,
                                        unsigned long long* keys, int64_t* out, cudaStream_t stream);
extern "C" int gq_argmax_ip_cuda_padded_dim(int D);

namespace {

torch::Tensor argmax_ip(torch::Tensor W, torch::Tensor F) {
  TORCH_CHECK(W.is_cuda() && F.is_cuda() && W.device() == F.device(),
              "gq cuda kernel: W and F must be on the same CUDA device");
  TORCH_CHECK(W.scalar_type() == torch::kFloat32 && F.scalar_type() == torch::kFloat32,
              "gq cuda kernel: W and F must be float32");
  TORCH_CHECK(W.dim() == 2 && F.dim() == 2 && W.size(1) == F.size(1), "gq cuda kernel: W (N, D) and F (K, D)");
  TORCH_CHECK(F.size(0) >= 1 && F.size(0) < (int64_t(1) << 31) - 1024, "gq cuda kernel: need 1 <= K < 2^31 - 1024");
  const int D = static_cast<int>(W.size(1));
  const int Dp = gq_argmax_ip_cuda_padded_dim(D);
  TORCH_CHECK(Dp > 0, "gq cuda kernel: D must be <= 64, got ", D);
  c10::cuda::CUDAGuard guard(W.device());
  if (Dp != D) {  // zero columns leave every score unchanged
    W = torch::constant_pad_nd(W, {0, Dp - D}, 0);
    F = torch::constant_pad_nd(F, {0, Dp - D}, 0);
  }
  W = W.contiguous();
  torch::Tensor FT = F.t().contiguous();  // D x K: coalesced codeword loads
  const int64_t N = W.size(0);
  auto out = torch::empty({N}, W.options().dtype(torch::kInt64));
  if (N == 0) return out;
  auto keys = torch::empty({N}, W.options().dtype(torch::kInt64));
  const int err = gq_argmax_ip_cuda_launch(W.data_ptr<float>(), FT.data_ptr<float>(), N,
                                           static_cast<int32_t>(F.size(0)), Dp,
                                           reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()),
                                           out.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "gq cuda kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_ip", &argmax_ip, "index[n] = argmax_k W[n].F[k] on CUDA (float32, smallest k on ties)",
        pybind11::arg("W"), pybind11::arg("F"));
}
