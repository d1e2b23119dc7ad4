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

namespace gmd_ext::cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline bool is_projection_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_G(const char* op, const at::Tensor& G) {
  TORCH_CHECK_VALUE(G.dim() == 2, op, ": G must be a 2-D [K, N] tensor, got a ", G.dim(), "-D tensor of shape ",
              G.sizes());
  TORCH_CHECK_TYPE(is_projection_dtype(G.scalar_type()), op, ": G must be float32, float16 or bfloat16, got ",
              G.scalar_type());
  TORCH_CHECK_VALUE(G.is_cuda(), op, ": G must be a CUDA tensor for the CUDA kernel, got ", G.device());
}

// Calls fn(T{}) with T the C++ type of a projection dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    default: return fn(c10::BFloat16{});
  }
}

inline int num_sms(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

}  // namespace gmd_ext::cuda
