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

// VEC consecutive elements of T as one aligned access: 16 bytes -> one 128-bit load or store in SASS.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename U>
__device__ __forceinline__ void load_pack(const T* p, U (&out)[VEC]) {
  const Pack<T, VEC> r = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<U>(r.v[k]);
}

// The 16-byte store is written in PTX: left to the compiler, a Pack store whose elements come out of a branch (the
// group-norm apply kernels: loaded-or-zero packs, then stored under the same bound) was split into 4 or 8 scalar
// stores (seen with nvcc 13.0, sm_80 and sm_90). A generic pointer to global memory is a valid st.global address.
template <typename T, int VEC, typename U>
__device__ __forceinline__ void store_pack(T* p, const U (&in)[VEC]) {
  Pack<T, VEC> r;
#pragma unroll
  for (int k = 0; k < VEC; ++k) r.v[k] = static_cast<T>(in[k]);
  if constexpr (sizeof(r) == 16) {
    uint32_t w[4];
    memcpy(w, &r, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = r;
  }
}

// Whether rows of t (2-D, unit column stride) start on `bytes` boundaries, so packs of `bytes` never straddle.
inline bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  return t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0 &&
         (t.dim() < 2 || (t.stride(0) * static_cast<int64_t>(t.element_size())) % bytes == 0);
}

// Resident CTAs of `kernel` per SM at `threads` and `smem` bytes, times the SM count: a grid that fills the GPU
// once. Only for kernels whose result does not depend on the grid (no cross-CTA reduction).
template <typename Kernel>
int64_t resident_ctas(Kernel kernel, int threads, size_t smem, const at::Tensor& t) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
}


}  // namespace gmd_ext::cuda
