// Shared helpers for the CUDA kernels of the GMD projection ops.
//
// The stream comes from c10::cuda::getCurrentCUDAStream(), which is what at::cuda::getCurrentCUDAStream()
// forwards to; including ATen/cuda/CUDAContext.h instead would pull in the cuBLAS/cuSPARSE headers for no use.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../projection_checks.h"

namespace gmd_ext::cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline int num_sms(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

}  // namespace gmd_ext::cuda
