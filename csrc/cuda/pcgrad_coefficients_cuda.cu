// pcgrad_coefficients(gram [K, K] fp32, perms [K, K] int64) -> A [K, K] fp32, CUDA.
//
// One single-CTA kernel, so a training step runs the whole projection without a host sync. Rows of A are
// independent: each warp owns rows i = warp, warp + nwarps, ... and runs the sequential loop of
// csrc/cpu/pcgrad_coefficients_cpu.cpp on them, with v = A_i Gamma and the coefficients in fp64 shared
// memory, lanes splitting the length-K updates. Every lane reads the same v[j] after __syncwarp, so the
// branch "project against j" is warp-uniform. When they fit (K <= 64 with 16 warps), Gamma and perms are first
// staged in shared memory, so the K dependent steps of a row read no global memory.
//
// An out-of-range perms entry cannot raise here without a host sync (and a device assert would poison the CUDA
// context): the kernel makes that row of A NaN instead, which the caller's finiteness check reports.
// project_conflicts validates its orders on the host before launching.
//
// Resources (nvcc 13.0 -Xptxas -v, sm_90): 40 registers staged, 48 unstaged, 0 bytes stack, 0 spills.
#include <torch/library.h>

#include <limits>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int64_t kSmem = 48 * 1024;  // without the opt-in attribute

template <bool STAGED>
__global__ void pcgrad_coefficients_kernel(const float* __restrict__ gram_g, const int64_t* __restrict__ perms_g,
                                           int K, float* __restrict__ A) {
  extern __shared__ double smem[];
  const int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t KK = static_cast<int64_t>(K) * K;
  double* v = smem + static_cast<int64_t>(warp) * 2 * K;
  double* a = v + K;
  const float* gram = gram_g;
  // Staged perms hold -1 for an out-of-range entry: int32 halves the footprint, K <= 4096 fits.
  int* perms_s = nullptr;
  if constexpr (STAGED) {
    float* gram_s = reinterpret_cast<float*>(smem + static_cast<int64_t>(nwarps) * 2 * K);
    perms_s = reinterpret_cast<int*>(gram_s + KK);
    for (int64_t e = threadIdx.x; e < KK; e += blockDim.x) {
      gram_s[e] = gram_g[e];
      const int64_t j = perms_g[e];
      perms_s[e] = j >= 0 && j < K ? static_cast<int>(j) : -1;
    }
    __syncthreads();
    gram = gram_s;
  }
  for (int i = warp; i < K; i += nwarps) {
    for (int l = lane; l < K; l += 32) {
      v[l] = static_cast<double>(gram[static_cast<int64_t>(i) * K + l]);
      a[l] = l == i ? 1.0 : 0.0;
    }
    __syncwarp();
    bool bad = false;
    for (int t = 0; t < K; ++t) {
      int64_t j;
      if constexpr (STAGED) {
        j = perms_s[static_cast<int64_t>(i) * K + t];
      } else {
        j = perms_g[static_cast<int64_t>(i) * K + t];
      }
      if (j < 0 || j >= K) {  // warp-uniform: every lane read the same entry
        bad = true;
        continue;
      }
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
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int l = lane; l < K; l += 32) A[static_cast<int64_t>(i) * K + l] = bad ? nan : static_cast<float>(a[l]);
    __syncwarp();
  }
}

}  // namespace

at::Tensor pcgrad_coefficients_cuda(const at::Tensor& gram, const at::Tensor& perms) {
  constexpr const char* op = "gmd_ext::pcgrad_coefficients";
  const int64_t K = check_pcgrad_args(op, gram, perms, at::kCUDA, "CUDA");
  // Two fp64 vectors of length K per warp in shared memory.
  TORCH_CHECK_VALUE(K <= kSmem / 16, op, ": the CUDA kernel supports K <= ", kSmem / 16, " objectives, got K = ", K);
  const c10::cuda::CUDAGuard guard(gram.device());
  at::Tensor A = at::empty({K, K}, gram.options());
  if (K == 0) return A;
  const at::Tensor g = gram.contiguous();
  const at::Tensor p = perms.contiguous();
  // Staging Gamma (fp32) and perms (int32) costs 8 K^2 bytes; keep at least min(K, 16) warps beside it.
  const int64_t staged_bytes = 8 * K * K;
  const int64_t warps_staged = std::min<int64_t>({K, 16, (kSmem - staged_bytes) / (16 * K)});
  const bool staged = warps_staged >= std::min<int64_t>(K, 16);
  const int nwarps = static_cast<int>(staged ? warps_staged
                                             : std::max<int64_t>(1, std::min<int64_t>({K, 32, kSmem / (16 * K)})));
  const size_t smem = static_cast<size_t>(nwarps) * 16 * K + (staged ? staged_bytes : 0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    kernel<<<1, nwarps * 32, smem, stream>>>(g.const_data_ptr<float>(), p.const_data_ptr<int64_t>(),
                                             static_cast<int>(K), A.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (staged) {
    launch(pcgrad_coefficients_kernel<true>);
  } else {
    launch(pcgrad_coefficients_kernel<false>);
  }
  return A;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) { m.impl("pcgrad_coefficients", &gmd_ext::cuda::pcgrad_coefficients_cuda); }
