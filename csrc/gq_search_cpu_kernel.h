#pragma once
// Fused score + argmax for Gaussian Quant on the CPU (float32, OpenMP).
//
//   index[n] = argmax_k  W[n] . F[k]      (smallest k on ties)
//
// W is (N, D), F is (K, D), both float32 row-major contiguous. No N x K buffer is formed:
//
//  * F is packed once into panels of NR = V * VL codewords laid out [d][NR] (VL = SIMD
//    width in floats: 16 with AVX-512, 8 with AVX2 / SSE / scalar), zero padded to a whole
//    panel; the padded lanes of the last panel are masked to -inf before the compare.
//  * The micro-kernel computes an MR x NR block of scores for MR rows and one panel in
//    MR * V vector registers: D-loop outer, each step loads V vectors of codeword features
//    and broadcasts MR row features (an outer-product FMA update, as in a GEMM micro-kernel).
//  * Each row keeps a running best per SIMD lane (value, index) in L1; a lane only ever
//    sees increasing codeword indices and updates on a strict '>', so it holds the earliest
//    maximiser of its lane. The final horizontal reduction takes the max value and, among
//    lanes holding it, the smallest index -> exactly "smallest k on ties".
//  * Rows are split into blocks of MC rows (OpenMP, dynamic schedule; with few blocks the
//    codebook is split as well, see search_impl). For each block the
//    packed codebook is streamed once in panels; a panel (D * NR floats, 8 KiB at D = 32)
//    stays in L1 while all MC rows of the block pass over it.
//
// Vectorisation uses GCC/Clang vector extensions, so the same source compiles to AVX-512,
// AVX2 or plain SSE depending on -march (the JIT build in gq_plugin/kernels.py uses
// -march=native; a prebuilt wheel must not).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gq_cpu {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

#ifndef GQ_MR
#define GQ_MR 6
#endif
#ifndef GQ_V
#define GQ_V 4
#endif
#ifndef GQ_MC
#define GQ_MC 48
#endif
constexpr int MR = GQ_MR;  // rows per micro-kernel
constexpr int V = GQ_V;   // vectors (of VL codewords) per micro-kernel
constexpr int NR = V * VL;
constexpr int MC = GQ_MC;  // rows per block (multiple of MR); best lanes of a block stay in L1

static inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
static inline vi viload(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof(vi));
  return v;
}
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
static inline void vistore(int32_t* p, vi v) { std::memcpy(p, &v, sizeof(vi)); }

// Scores of MR rows (w: MR x D, row-major, stride D) against one packed panel (D x NR),
// folded into the running per-lane best of each row (best_v/best_i: MR x VL).
// DT > 0: compile-time D (fully unrolled); DT == 0: runtime D.
template <int DT, bool LAST>
static inline void micro_kernel(const float* __restrict w, const float* __restrict panel, int d_rt,
                                int32_t k0, int32_t k_total, float* __restrict best_v,
                                int32_t* __restrict best_i) {
  const int D = DT > 0 ? DT : d_rt;
  vf acc[MR][V];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
#pragma GCC unroll 8
  for (int d = 0; d < D; ++d) {
    vf f[V];
    for (int v = 0; v < V; ++v) f[v] = vload(panel + d * NR + v * VL);
    for (int r = 0; r < MR; ++r) {
      const float x = w[r * D + d];
      for (int v = 0; v < V; ++v) acc[r][v] += x * f[v];
    }
  }
  vi lane;
  for (int l = 0; l < VL; ++l) lane[l] = l;
  if (LAST) {
    const vf ninf = vf{} - std::numeric_limits<float>::infinity();
    for (int v = 0; v < V; ++v) {
      const vi idx = lane + (k0 + v * VL);
      const vi valid = idx < k_total;
      for (int r = 0; r < MR; ++r) acc[r][v] = valid ? acc[r][v] : ninf;
    }
  }
  for (int r = 0; r < MR; ++r) {
    vf bv = vload(best_v + r * VL);
    vi bi = viload(best_i + r * VL);
    for (int v = 0; v < V; ++v) {  // increasing k: strict '>' keeps the earliest index
      const vi better = acc[r][v] > bv;
      bv = better ? acc[r][v] : bv;
      bi = better ? (lane + (k0 + v * VL)) : bi;
    }
    vstore(best_v + r * VL, bv);
    vistore(best_i + r * VL, bi);
  }
}

template <int DT>
static void search_impl(const float* W, const float* packed, int64_t N, int32_t K, int D, int64_t* out) {
  const int32_t n_panels = (K + NR - 1) / NR;
  const int64_t n_blocks = (N + MC - 1) / MC;
  // Few row blocks (small N): also split the codebook, so every thread gets work. Each split
  // writes its per-row best to part_v/part_i; they are merged in split order (ties -> the
  // earlier split, i.e. the smaller index). Memory O(N * splits), splits <= 4 * threads.
#ifdef _OPENMP
  const int64_t n_threads = omp_get_max_threads();
#else
  const int64_t n_threads = 1;
#endif
  int64_t splits = 1;
  if (n_threads > 1 && n_blocks < 4 * n_threads)
    splits = std::min<int64_t>((4 * n_threads + n_blocks - 1) / n_blocks, n_panels);
  const int32_t per_split = static_cast<int32_t>((n_panels + splits - 1) / splits);
  splits = (n_panels + per_split - 1) / per_split;
  std::vector<float> part_v(splits > 1 ? static_cast<size_t>(splits * N) : 0);
  std::vector<int32_t> part_i(splits > 1 ? static_cast<size_t>(splits * N) : 0);
#pragma omp parallel
  {
    std::vector<float> wbuf(static_cast<size_t>(MC) * D);
    std::vector<float> bv(static_cast<size_t>(MC) * VL);
    std::vector<int32_t> bi(static_cast<size_t>(MC) * VL);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_blocks * splits; ++t) {
      const int64_t b = t / splits, s = t % splits;
      const int32_t p_begin = static_cast<int32_t>(s) * per_split;
      const int32_t p_end = std::min<int32_t>(n_panels, p_begin + per_split);
      const int64_t n0 = b * MC;
      const int rows = static_cast<int>(std::min<int64_t>(MC, N - n0));
      const int rows_pad = (rows + MR - 1) / MR * MR;
      std::memcpy(wbuf.data(), W + n0 * D, sizeof(float) * rows * D);
      if (rows_pad > rows) std::memset(wbuf.data() + rows * D, 0, sizeof(float) * (rows_pad - rows) * D);
      std::fill(bv.begin(), bv.end(), -std::numeric_limits<float>::infinity());
      std::fill(bi.begin(), bi.end(), p_begin * NR);
      for (int32_t p = p_begin; p < p_end; ++p) {
        const float* panel = packed + static_cast<int64_t>(p) * D * NR;
        const int32_t k0 = p * NR;
        const bool last = (p == n_panels - 1) && (K % NR != 0);
        for (int r = 0; r < rows_pad; r += MR) {
          if (last)
            micro_kernel<DT, true>(wbuf.data() + r * D, panel, D, k0, K, bv.data() + r * VL, bi.data() + r * VL);
          else
            micro_kernel<DT, false>(wbuf.data() + r * D, panel, D, k0, K, bv.data() + r * VL, bi.data() + r * VL);
        }
      }
      for (int r = 0; r < rows; ++r) {  // lanes -> row: max value, smallest index among equals
        float m = -std::numeric_limits<float>::infinity();
        int32_t mi = std::numeric_limits<int32_t>::max();
        for (int l = 0; l < VL; ++l) {
          const float v = bv[r * VL + l];
          const int32_t i = bi[r * VL + l];
          if (v > m || (v == m && i < mi)) {
            m = v;
            mi = i;
          }
        }
        if (mi == std::numeric_limits<int32_t>::max()) mi = p_begin * NR;  // all scores NaN
        if (splits == 1) {
          out[n0 + r] = mi;
        } else {
          part_v[s * N + n0 + r] = m;
          part_i[s * N + n0 + r] = mi;
        }
      }
    }
  }
  if (splits > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      float m = part_v[n];
      int32_t mi = part_i[n];
      for (int64_t s = 1; s < splits; ++s)
        if (part_v[s * N + n] > m) {  // strict: the earlier split keeps ties
          m = part_v[s * N + n];
          mi = part_i[s * N + n];
        }
      out[n] = mi;
    }
  }
}

// Pack F (K x D) into panels [p][d][NR], zero padded.
static std::unique_ptr<float[]> pack_codebook(const float* F, int32_t K, int D) {
  const int32_t n_panels = (K + NR - 1) / NR;
  // no zero-initialisation of the whole buffer: only the padding of the last panel needs it
  std::unique_ptr<float[]> packed(new float[static_cast<size_t>(n_panels) * D * NR]);
#pragma omp parallel for schedule(static)
  for (int32_t p = 0; p < n_panels; ++p) {
    float* dst = packed.get() + static_cast<int64_t>(p) * D * NR;
    const int32_t kn = std::min<int32_t>(NR, K - p * NR);
    if (kn < NR)
      for (int d = 0; d < D; ++d) std::memset(dst + d * NR + kn, 0, sizeof(float) * (NR - kn));
    for (int32_t j = 0; j < kn; ++j) {
      const float* src = F + static_cast<int64_t>(p * NR + j) * D;
      for (int d = 0; d < D; ++d) dst[d * NR + j] = src[d];
    }
  }
  return packed;
}

// index[n] = argmax_k W[n].F[k]; W: N x D, F: K x D (row-major float32), out: N int64.
inline void argmax_ip(const float* W, const float* F, int64_t N, int32_t K, int D, int64_t* out) {
  const std::unique_ptr<float[]> packed = pack_codebook(F, K, D);
  switch (D) {
    case 2: search_impl<2>(W, packed.get(), N, K, D, out); break;
    case 4: search_impl<4>(W, packed.get(), N, K, D, out); break;
    case 8: search_impl<8>(W, packed.get(), N, K, D, out); break;
    case 16: search_impl<16>(W, packed.get(), N, K, D, out); break;
    case 32: search_impl<32>(W, packed.get(), N, K, D, out); break;
    case 64: search_impl<64>(W, packed.get(), N, K, D, out); break;
    default: search_impl<0>(W, packed.get(), N, K, D, out); break;
  }
}

}  // namespace gq_cpu
