// gram(G [K, N]) -> G G^T [K, K] fp32, CUDA: pass 1 of the GMD projection (docs/design.md).
//
// The upper triangle of Gamma is cut into 4 x 4 tiles of row pairs. Kernel 1: blockIdx.x is the tile and
// blockIdx.y a slice of columns; every thread keeps a 4 x 4 register tile of fp32 products over its columns,
// and the CTA reduces it to one partial per (slice, tile). The tile index varies fastest so the CTAs that
// read the same columns run together and share them through L2 (G is read from DRAM about once).
// Kernel 2 adds the partials of each entry over the slices in fp64, in slice order: deterministic.
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int kTile = 4;

// Linear tile index t -> first rows (i0, j0) of the t-th upper-triangle tile (i0 <= j0), P tile rows.
__device__ __forceinline__ void tile_rows(int t, int P, int& i0, int& j0) {
  int I = 0;
  while (t >= P - I) {
    t -= P - I;
    ++I;
  }
  i0 = I * kTile;
  j0 = (I + t) * kTile;
}

template <typename T>
__global__ void gram_partial_kernel(const T* __restrict__ G, int K, int64_t N, int64_t s0, int64_t s1, int P,
                                    float* __restrict__ partial) {
  int i0, j0;
  tile_rows(blockIdx.x, P, i0, j0);
  const T* a[kTile];
  const T* b[kTile];
  bool a_ok[kTile], b_ok[kTile];
#pragma unroll
  for (int r = 0; r < kTile; ++r) {
    a_ok[r] = i0 + r < K;
    b_ok[r] = j0 + r < K;
    a[r] = G + (a_ok[r] ? i0 + r : 0) * s0;
    b[r] = G + (b_ok[r] ? j0 + r : 0) * s0;
  }
  float acc[kTile][kTile] = {};
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float x[kTile], y[kTile];
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      x[r] = a_ok[r] ? static_cast<float>(a[r][n * s1]) : 0.f;
      y[r] = b_ok[r] ? static_cast<float>(b[r][n * s1]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i)
#pragma unroll
      for (int j = 0; j < kTile; ++j) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
  }
  __shared__ float red[kThreads / 32][kTile * kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < kTile * kTile; ++e) {
    const float v = warp_sum(acc[e / kTile][e % kTile]);
    if (lane == 0) red[warp][e] = v;
  }
  __syncthreads();
  if (threadIdx.x < kTile * kTile) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][threadIdx.x];
    partial[(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kTile * kTile + threadIdx.x] = s;
  }
}

// One thread per (tile, entry): sum over slices in fp64 and write both symmetric entries.
__global__ void gram_finalize_kernel(const float* __restrict__ partial, int slices, int ntiles, int P, int K,
                                     float* __restrict__ out) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= ntiles * kTile * kTile) return;
  const int t = idx / (kTile * kTile), e = idx % (kTile * kTile);
  int i0, j0;
  tile_rows(t, P, i0, j0);
  const int i = i0 + e / kTile, j = j0 + e % kTile;
  if (i >= K || j >= K || (i0 == j0 && j < i)) return;
  double s = 0.0;
  for (int sl = 0; sl < slices; ++sl) s += partial[(static_cast<int64_t>(sl) * ntiles + t) * kTile * kTile + e];
  out[i * K + j] = static_cast<float>(s);
  out[j * K + i] = static_cast<float>(s);
}

}  // namespace

at::Tensor gram_cuda(const at::Tensor& G) {
  constexpr const char* op = "gmd_ext::gram";
  check_G(op, G, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t K = G.size(0), N = G.size(1);
  TORCH_CHECK_VALUE(K <= 4096, op, ": the CUDA kernel supports K <= 4096 objectives, got K = ", K);
  at::Tensor out = at::zeros({K, K}, G.options().dtype(at::kFloat));
  if (K == 0 || N == 0) return out;
  const int P = static_cast<int>((K + kTile - 1) / kTile);
  const int ntiles = P * (P + 1) / 2;
  // About 8 resident CTAs per SM in total, but at least a few columns per thread and at most 65535 slices.
  const int64_t want = std::max<int64_t>(1, 8LL * num_sms(G) / ntiles);
  const int slices = static_cast<int>(std::min<int64_t>({want, (N + kThreads - 1) / kThreads, 65535}));
  at::Tensor partial = at::empty({slices, ntiles, kTile * kTile}, G.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gram_partial_kernel<T><<<dim3(ntiles, slices), kThreads, 0, stream>>>(
        G.const_data_ptr<T>(), static_cast<int>(K), N, G.stride(0), G.stride(1), P, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int entries = ntiles * kTile * kTile;
  gram_finalize_kernel<<<(entries + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), slices, ntiles, P, static_cast<int>(K), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) { m.impl("gram", &gmd_ext::cuda::gram_cuda); }
