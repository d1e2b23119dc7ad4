// pcgrad_coefficients(gram [K, K] fp32, perms [K, K] int64) -> A [K, K] fp32, CUDA.
//
// One single-CTA kernel, so a training step runs the whole projection without a host sync. Rows of A are
// independent: each warp owns rows i = warp, warp + nwarps, ... and runs the sequential loop of
// csrc/cpu/pcgrad_coefficients_cpu.cpp on them, with v = A_i Gamma and the coefficients in fp64 shared
// memory, lanes splitting the length-K updates. Every lane reads the same v[j] after __syncwarp, so the
// branch "project against j" is warp-uniform.
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

__global__ void pcgrad_coefficients_kernel(const float* __restrict__ gram, const int64_t* __restrict__ perms, int K,
                                           float* __restrict__ A) {
  extern __shared__ double smem[];
  const int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* v = smem + static_cast<int64_t>(warp) * 2 * K;
  double* a = v + K;
  for (int i = warp; i < K; i += nwarps) {
    for (int l = lane; l < K; l += 32) {
      v[l] = static_cast<double>(gram[static_cast<int64_t>(i) * K + l]);
      a[l] = l == i ? 1.0 : 0.0;
    }
    __syncwarp();
    for (int t = 0; t < K; ++t) {
      const int64_t j = perms[static_cast<int64_t>(i) * K + t];
      CUDA_KERNEL_ASSERT(j >= 0 && j < K && "gmd_ext::pcgrad_coefficients: perms entry out of range");
      const double d = v[j];
      const double norm2 = static_cast<double>(gram[j * K + j]);
      __syncwarp();  // every lane has read v[j] before any lane updates v
      if (d < 0 && norm2 > 0) {
        const double alpha = d / norm2;
        if (lane == 0) a[j] -= alpha;
        for (int l = lane; l < K; l += 32) v[l] -= alpha * static_cast<double>(gram[j * K + l]);
      }
      __syncwarp();
    }
    for (int l = lane; l < K; l += 32) A[static_cast<int64_t>(i) * K + l] = static_cast<float>(a[l]);
    __syncwarp();
  }
}

}  // namespace

at::Tensor pcgrad_coefficients_cuda(const at::Tensor& gram, const at::Tensor& perms) {
  constexpr const char* op = "gmd_ext::pcgrad_coefficients";
  const int64_t K = check_pcgrad_args(op, gram, perms, at::kCUDA, "CUDA");
  // Two fp64 vectors of length K per warp in shared memory (48 KiB without opt-in).
  constexpr int64_t kSmem = 48 * 1024;
  TORCH_CHECK_VALUE(K <= kSmem / 16, op, ": the CUDA kernel supports K <= ", kSmem / 16, " objectives, got K = ", K);
  const c10::cuda::CUDAGuard guard(gram.device());
  at::Tensor A = at::empty({K, K}, gram.options());
  if (K == 0) return A;
  const at::Tensor g = gram.contiguous();
  const at::Tensor p = perms.contiguous();
  const int nwarps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({K, 32, kSmem / (16 * K)})));
  const size_t smem = static_cast<size_t>(nwarps) * 16 * K;
  pcgrad_coefficients_kernel<<<1, nwarps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<float>(), p.const_data_ptr<int64_t>(), static_cast<int>(K), A.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return A;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) { m.impl("pcgrad_coefficients", &gmd_ext::cuda::pcgrad_coefficients_cuda); }
