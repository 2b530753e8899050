// Fused score + argmax for Gaussian Quant on CUDA (float32).
//
//   index[n] = argmax_k  W[n] . FT[:, k]      (smallest k on ties)
//
// Plain CUDA (no torch headers), so it compiles as a standalone object with nvcc; the torch
// binding lives in gq_search_cuda.cpp and calls gq_argmax_ip_cuda_launch() with raw pointers.
//
// Work split: block (bx, by) owns BR rows (bx) and a contiguous chunk of codewords (by).
//  * The block's W tile (BR x D) is staged in shared memory; every thread of a warp reads the
//    same element at the same time (a broadcast, no bank conflicts).
//  * Thread t walks codewords k = chunk_begin + t, + blockDim.x, ... in increasing order; it
//    holds its codeword's D features in registers (FT is D x K, so the loads are coalesced)
//    and a running (best value, best index) per row in registers, updated on a strict '>', so
//    each thread keeps its earliest maximiser.
//  * Per row, the threads' results are packed into a 64-bit key
//        key = ordered_bits(value) << 32 | (0xFFFFFFFF - k)
//    (a larger key = a larger score, or the same score and a smaller index), reduced across the
//    warp with shuffles and merged across warps and K-chunks with one atomicMax per warp and row
//    into keys[N] (zero-initialised). A last tiny kernel turns keys into indices.
// Memory: keys (8 bytes per row) + the output; no N x K buffer.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ unsigned long long make_key(float v, int32_t k) {
  unsigned int u = __float_as_uint(v);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone map float -> uint32
  return (static_cast<unsigned long long>(u) << 32) |
         static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<unsigned int>(k));
}

template <int D, int BR>
__global__ void __launch_bounds__(kThreads, 2) argmax_ip_kernel(const float* __restrict__ W,
                                                               const float* __restrict__ FT, int64_t N,
                                                               int32_t K, int32_t k_per_block,
                                                               unsigned long long* __restrict__ keys) {
  __shared__ __align__(16) float ws[BR * D];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BR;
  const int rows = static_cast<int>(N - n0 < BR ? N - n0 : BR);
  for (int i = threadIdx.x; i < BR * D; i += blockDim.x) {
    const int r = i / D;
    ws[i] = r < rows ? W[(n0 + r) * D + (i - r * D)] : 0.0f;
  }
  __syncthreads();

  const int32_t k_begin = static_cast<int32_t>(blockIdx.y) * k_per_block;
  const int32_t k_end = (K - k_begin < k_per_block) ? K : k_begin + k_per_block;

  float best_v[BR];
  int32_t best_i[BR];
#pragma unroll
  for (int r = 0; r < BR; ++r) {
    best_v[r] = -__int_as_float(0x7f800000);  // -inf
    best_i[r] = -1;                           // no candidate yet
  }

  for (int32_t k = k_begin + static_cast<int32_t>(threadIdx.x); k < k_end; k += blockDim.x) {
    float f[D];
#pragma unroll
    for (int d = 0; d < D; ++d) f[d] = __ldg(FT + static_cast<int64_t>(d) * K + k);
#pragma unroll
    for (int r = 0; r < BR; ++r) {
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < D; ++d) s = fmaf(ws[r * D + d], f[d], s);
      // first candidate always taken (also if s is -inf), later ones on a strict '>'
      if (best_i[r] < 0 || s > best_v[r]) {
        best_v[r] = s;
        best_i[r] = k;
      }
    }
  }

  const unsigned lane = threadIdx.x & 31u;
#pragma unroll
  for (int r = 0; r < BR; ++r) {
    unsigned long long key = best_i[r] < 0 ? 0ull : make_key(best_v[r], best_i[r]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, off);
      key = other > key ? other : key;
    }
    if (lane == 0 && r < rows && key != 0ull) atomicMax(keys + n0 + r, key);
  }
}

__global__ void keys_to_index_kernel(const unsigned long long* __restrict__ keys, int64_t N,
                                     int64_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) {
    const unsigned long long key = keys[n];
    out[n] = key == 0ull ? 0 : static_cast<int64_t>(0xFFFFFFFFu - static_cast<unsigned int>(key & 0xFFFFFFFFull));
  }
}

template <int D, int BR>
cudaError_t launch(const float* W, const float* FT, int64_t N, int32_t K, unsigned long long* keys,
                   cudaStream_t stream) {
  int device = 0, sms = 80;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks_x = (N + BR - 1) / BR;
  // split K so that there are at least ~8 blocks per SM, but keep >= 4 codewords per thread
  const int64_t want = 8LL * sms;
  int64_t splits = blocks_x >= want ? 1 : (want + blocks_x - 1) / blocks_x;
  const int64_t max_splits = (K + 4LL * kThreads - 1) / (4LL * kThreads);
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  const int64_t k_per_block = (K + splits - 1) / splits;
  splits = (K + k_per_block - 1) / k_per_block;
  if (blocks_x > 0x7fffffffLL) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits));
  argmax_ip_kernel<D, BR><<<grid, kThreads, 0, stream>>>(W, FT, N, K, static_cast<int32_t>(k_per_block), keys);
  return cudaGetLastError();
}

}  // namespace

// W: N x D (row-major), FT: D x K (row-major, i.e. F transposed), keys: N (scratch, any content),
// out: N int64. D must be one of 2, 4, 8, 16, 32, 64 (callers zero-pad other D: zero columns do
// not change any score). All pointers are device pointers; runs asynchronously on `stream`.
extern "C" int gq_argmax_ip_cuda_launch(const float* W, const float* FT, int64_t N, int32_t K, int D,
                                        unsigned long long* keys, int64_t* out, cudaStream_t stream) {
  if (N <= 0) return static_cast<int>(cudaSuccess);
  if (K <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = cudaMemsetAsync(keys, 0, sizeof(unsigned long long) * static_cast<size_t>(N), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  switch (D) {
    case 2: err = launch<2, 32>(W, FT, N, K, keys, stream); break;
    case 4: err = launch<4, 32>(W, FT, N, K, keys, stream); break;
    case 8: err = launch<8, 32>(W, FT, N, K, keys, stream); break;
    case 16: err = launch<16, 24>(W, FT, N, K, keys, stream); break;
    case 32: err = launch<32, 20>(W, FT, N, K, keys, stream); break;
    case 64: err = launch<64, 8>(W, FT, N, K, keys, stream); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  keys_to_index_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(keys, N, out);
  return static_cast<int>(cudaGetLastError());
}

// Supported (padded) feature sizes, for the binding.
extern "C" int gq_argmax_ip_cuda_padded_dim(int D) {
  const int sizes[] = {2, 4, 8, 16, 32, 64};
  for (int s : sizes)
    if (D <= s) return s;
  return -1;
}
