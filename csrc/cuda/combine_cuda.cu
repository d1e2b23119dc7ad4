// combine(G [K, N], c [K], shared [N] | None, shared_scale, other_scale) -> [N] and
// combine_rows(G [K, N], A [R, K]) -> A @ G [R, N], CUDA: pass 2 of the GMD projection (docs/design.md).
//
// Each thread owns VEC consecutive columns (grid-stride). When G's rows are unit-stride and 16-byte aligned
// (gmd_ext.ops.padded_rows gives such buffers), a row's VEC elements are one 128-bit load (16 bytes: 4 fp32 or
// 8 fp16/bf16) and the K loop is unrolled by 4, so 4 such loads are in flight per thread; otherwise VEC = 1 with
// any strides. fp32 math, one rounding to G's dtype. combine_rows gives each thread up to 8 output rows so every
// loaded element of G feeds 8 FMAs, with 4-element packs (8 rows x 4 columns of accumulators), and loads 4 rows of
// G before their first use (4 independent loads in flight per thread).
// Every column is computed by one thread in a fixed order: the grid size does not change the result.
//
// Resources (nvcc 13.0 -Xptxas -v, without --use_fast_math, measured by .ci/compile_cuda.sh; checked by
// tests/test_gpu.py::test_cuda_resources), registers sm_80 / sm_90: combine 32 / 34 (fp32 packs), 40 / 40 (16-bit
// packs), 31-32 / 32 (scalar); combine_rows 72 / 80 (packs), 59-61 / 48 (scalar); 0 bytes stack, 0 spills at 256
// threads. Grids: one wave of resident CTAs (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs), capped by the
// columns.
//
// Expected fraction of a device-to-device copy on an H100 SXM (an estimate from these counts and the SASS: nothing
// ran on a GPU; Little's law: ~3.0 TB/s x ~0.7 us of latency is ~16 KiB in flight per SM). combine: per k row a
// 16-byte load and VEC FMAs, 4 loads in flight per thread, 8 CTAs (64 warps) per SM: ~128 KiB in flight, issue
// far below the limit: ~85-90 %. combine_rows (R = K, fp32): 3 CTAs (24 warps) per SM by registers, 4 loads of
// 512 bytes per warp in flight (48 KiB per SM; before, one: 12 KiB, latency-bound at ~55-65 %), ~170 instructions
// per 2 KiB of G per warp (1.1 of 4 issue slots per cycle): ~75-85 %, the output rows written once.
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int kRowsPerThread = 8;
constexpr int kUnroll = 4;  // combine_rows: rows of G loaded ahead per thread

// out[n] = scale(n) * sum_k c[k] G[k, n] for one column, scalar loads with any strides: the VEC = 1 kernel's body
// and the vector kernel's tail (the last N % VEC columns).
template <typename T>
__device__ __forceinline__ void combine_column(const T* __restrict__ G, int64_t K, int64_t s0, int64_t s1, int64_t n,
                                               const float* __restrict__ c, const bool* __restrict__ shared,
                                               float shared_scale, float other_scale, T* __restrict__ out) {
  float acc = 0.f;
#pragma unroll 4
  for (int64_t k = 0; k < K; ++k) acc = fmaf(__ldg(c + k), static_cast<float>(G[k * s0 + n * s1]), acc);
  out[n] = static_cast<T>(acc * (shared == nullptr || shared[n] ? shared_scale : other_scale));
}

// VEC > 1 (rows unit-stride and 16-byte aligned): whole packs only in the grid-stride loop, so its body has no
// bounds branch; CTA 0 computes the last N % VEC columns. (A per-pack tail branch inside the unrolled K loop made
// ptxas spill 8 bytes on sm_80 for the 16-bit packs.)
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) combine_kernel(const T* __restrict__ G, int64_t K, int64_t N, int64_t s0,
                                                           int64_t s1, const float* __restrict__ c,
                                                           const bool* __restrict__ shared, float shared_scale,
                                                           float other_scale, T* __restrict__ out) {
  const int64_t whole = N / VEC * VEC;
  // The tail first: its values are dead before the loop starts (at the end, ptxas kept one of them live across the
  // loop and spilled it, 8 bytes on sm_90 for the bf16 packs).
  if (VEC > 1 && blockIdx.x == 0 && whole + threadIdx.x < N)
    combine_column<T>(G, K, s0, s1, whole + threadIdx.x, c, shared, shared_scale, other_scale, out);
  for (int64_t n0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; n0 < whole;
       n0 += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    if constexpr (VEC == 1) {
      combine_column<T>(G, K, s0, s1, n0, c, shared, shared_scale, other_scale, out);
    } else {
      float acc[VEC] = {};
#pragma unroll 4
      for (int64_t k = 0; k < K; ++k) {
        const float ck = __ldg(c + k);
        float x[VEC];
        load_pack<T, VEC>(G + k * s0 + n0, x);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(ck, x[v], acc[v]);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] *= shared == nullptr || shared[n0 + v] ? shared_scale : other_scale;
      store_pack<T, VEC>(out + n0, acc);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) combine_rows_kernel(const T* __restrict__ G, int64_t K, int64_t N,
                                                                int64_t s0, int64_t s1, const float* __restrict__ A,
                                                                int64_t R, T* __restrict__ out, bool out_vec) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerThread;
  const int rows = static_cast<int>(R - r0 < kRowsPerThread ? R - r0 : kRowsPerThread);
  for (int64_t n0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC; n0 < N;
       n0 += static_cast<int64_t>(gridDim.y) * blockDim.x * VEC) {
    float acc[kRowsPerThread][VEC] = {};
    const bool full = VEC > 1 && n0 + VEC <= N;
    int64_t k = 0;
    if (full) {
      // kUnroll packs of G loaded before their first use: kUnroll independent 16-byte loads in flight per thread
      // (one before: latency-bound at ~24 resident warps per SM). The FMA order per accumulator is unchanged
      // (k ascending), so the result is the same bits as the one-row-at-a-time loop.
      for (; k + kUnroll <= K; k += kUnroll) {
        float g[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_pack<T, VEC>(G + (k + u) * s0 + n0, g[u]);
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          if (r < rows) {
            const float* a = A + (r0 + r) * K + k;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
              const float au = __ldg(a + u);
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(au, g[u][v], acc[r][v]);
            }
          }
        }
      }
    }
    for (; k < K; ++k) {
      float g[VEC];
      if (full) {
        load_pack<T, VEC>(G + k * s0 + n0, g);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) g[v] = n0 + v < N ? static_cast<float>(G[k * s0 + (n0 + v) * s1]) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        if (r < rows) {
          const float a = __ldg(A + (r0 + r) * K + k);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(a, g[v], acc[r][v]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (r >= rows) continue;
      T* o = out + (r0 + r) * N + n0;
      if (full && out_vec) {
        store_pack<T, VEC>(o, acc[r]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          if (n0 + v < N) o[v] = static_cast<T>(acc[r][v]);
      }
    }
  }
}

}  // namespace

at::Tensor combine_cuda(const at::Tensor& G, const at::Tensor& c, const std::optional<at::Tensor>& shared,
                        double shared_scale, double other_scale) {
  constexpr const char* op = "gmd_ext::combine";
  check_G(op, G, c10::DeviceType::CUDA, "CUDA");
  const int64_t K = G.size(0), N = G.size(1);
  check_combine_args(op, G, c, shared);
  at::Tensor shared_c;
  const c10::cuda::CUDAGuard guard(G.device());
  if (shared.has_value()) shared_c = shared->contiguous();
  at::Tensor out = at::empty({N}, G.options());
  if (N == 0) return out;
  const at::Tensor coef = c.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const auto launch = [&](auto kernel, int vec) {
      const int64_t want = (N + static_cast<int64_t>(kThreads) * vec - 1) / (static_cast<int64_t>(kThreads) * vec);
      const int64_t blocks = std::min<int64_t>({want, resident_ctas(kernel, kThreads, 0, G), 65535});
      kernel<<<blocks, kThreads, 0, stream>>>(
          G.const_data_ptr<T>(), K, N, G.stride(0), G.stride(1), coef.const_data_ptr<float>(),
          shared_c.defined() ? shared_c.const_data_ptr<bool>() : nullptr, static_cast<float>(shared_scale),
          static_cast<float>(other_scale), out.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows_aligned(G, 16)) {
      launch(combine_kernel<T, kVec>, kVec);
    } else {
      launch(combine_kernel<T, 1>, 1);
    }
  });
  return out;
}

at::Tensor combine_rows_cuda(const at::Tensor& G, const at::Tensor& A) {
  constexpr const char* op = "gmd_ext::combine_rows";
  check_G(op, G, c10::DeviceType::CUDA, "CUDA");
  const int64_t K = G.size(0), N = G.size(1);
  check_combine_rows_args(op, G, A);
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t R = A.size(0);
  at::Tensor out = at::empty({R, N}, G.options());
  if (R == 0 || N == 0) return out;
  const at::Tensor coef = A.contiguous();
  const int64_t groups = (R + kRowsPerThread - 1) / kRowsPerThread;
  TORCH_CHECK_VALUE(groups <= 2147483647LL, op, ": A must have at most 2^34 rows, got R = ", R);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 4;  // 4 columns x 8 rows of accumulators; 16 bytes per load for fp32, 8 for 16-bit
    const auto launch = [&](auto kernel, int vec) {
      const int64_t want = (N + static_cast<int64_t>(kThreads) * vec - 1) / (static_cast<int64_t>(kThreads) * vec);
      const int64_t fill = std::max<int64_t>(1, resident_ctas(kernel, kThreads, 0, G) / groups);
      const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(std::min<int64_t>({want, fill, 65535})));
      kernel<<<grid, kThreads, 0, stream>>>(G.const_data_ptr<T>(), K, N, G.stride(0), G.stride(1),
                                            coef.const_data_ptr<float>(), R, out.data_ptr<T>(),
                                            N % kVec == 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows_aligned(G, kVec * sizeof(T))) {
      launch(combine_rows_kernel<T, kVec>, kVec);
    } else {
      launch(combine_rows_kernel<T, 1>, 1);
    }
  });
  return out;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) {
  m.impl("combine", &gmd_ext::cuda::combine_cuda);
  m.impl("combine_rows", &gmd_ext::cuda::combine_rows_cuda);
}
