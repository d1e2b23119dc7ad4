// combine(G [K, N], c [K], shared [N] | None, shared_scale, other_scale) -> [N] and
// combine_rows(G [K, N], A [R, K]) -> A @ G [R, N], CUDA: pass 2 of the GMD projection (docs/design.md).
//
// One thread per column (grid-stride), coalesced over columns when G's column stride is 1; fp32 math, one
// rounding to G's dtype. combine_rows gives each thread up to 8 output rows so every loaded element of G
// feeds 8 FMAs; the row group varies fastest across blockIdx.x so groups reading the same columns share L2.
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int kRowsPerThread = 8;

template <typename T>
__global__ void combine_kernel(const T* __restrict__ G, int64_t K, int64_t N, int64_t s0, int64_t s1,
                               const float* __restrict__ c, const bool* __restrict__ shared, float shared_scale,
                               float other_scale, T* __restrict__ out) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc = fmaf(__ldg(c + k), static_cast<float>(G[k * s0 + n * s1]), acc);
    const float scale = (shared == nullptr || shared[n]) ? shared_scale : other_scale;
    out[n] = static_cast<T>(acc * scale);
  }
}

template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ G, int64_t K, int64_t N, int64_t s0, int64_t s1,
                                    const float* __restrict__ A, int64_t R, T* __restrict__ out) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerThread;
  const int rows = static_cast<int>(R - r0 < kRowsPerThread ? R - r0 : kRowsPerThread);
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float acc[kRowsPerThread] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float g = static_cast<float>(G[k * s0 + n * s1]);
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r)
        if (r < rows) acc[r] = fmaf(__ldg(A + (r0 + r) * K + k), g, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r)
      if (r < rows) out[(r0 + r) * N + n] = static_cast<T>(acc[r]);
  }
}

int64_t column_blocks(const at::Tensor& G, int64_t N, int64_t parallel_groups) {
  const int64_t want = std::max<int64_t>(1, 16LL * num_sms(G) / std::max<int64_t>(parallel_groups, 1));
  return std::min<int64_t>({want, (N + kThreads - 1) / kThreads, 65535});
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
  const int64_t blocks = column_blocks(G, N, 1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    combine_kernel<T><<<blocks, kThreads, 0, stream>>>(
        G.const_data_ptr<T>(), K, N, G.stride(0), G.stride(1), coef.const_data_ptr<float>(),
        shared_c.defined() ? shared_c.const_data_ptr<bool>() : nullptr, static_cast<float>(shared_scale),
        static_cast<float>(other_scale), out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK_VALUE(groups <= 2147483647LL, op, ": too many rows in A (", R, ")");
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(column_blocks(G, N, groups)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    combine_rows_kernel<T><<<grid, kThreads, 0, stream>>>(G.const_data_ptr<T>(), K, N, G.stride(0), G.stride(1),
                                                          coef.const_data_ptr<float>(), R, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) {
  m.impl("combine", &gmd_ext::cuda::combine_cuda);
  m.impl("combine_rows", &gmd_ext::cuda::combine_rows_cuda);
}
