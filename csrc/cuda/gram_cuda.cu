// gram(G [K, N]) -> G G^T [K, K] fp32, CUDA: pass 1 of the GMD projection (docs/design.md).
//
// Rows are cut into blocks of 64; CTA (slice, block pair) stages a chunk of columns of both row blocks (one for
// a diagonal pair) in shared memory and computes every 4 x 4 tile of the pair from it, so G is read from DRAM
// once (K <= 64: one block pair, every CTA computes all of Gamma). Staging uses 128-bit loads when rows are
// unit-stride and 16-byte aligned (gmd_ext.ops.padded_rows gives such buffers), scalar loads otherwise; the
// 128-bit path stages whole packs only and the finalize kernel adds the last N % VEC columns.
// Each thread accumulates at most one chunk (<= 1024 columns / threads per tile) in fp32, then folds into fp64,
// so the fp32 error does not grow with N. Kernel 2 adds the fp64 partials over slices in slice order.
//
// The slice count is a function of K, N and the load path (128-bit or scalar) only, never of the device: the result
// is bit-identical on every GPU.
//
// Resources (nvcc 13.0 -Xptxas -v, without --use_fast_math, measured by .ci/compile_cuda.sh; checked by
// tests/test_gpu.py::test_cuda_resources), registers sm_80 / sm_90: gram_partial_kernel 64 / 64 (fp32, 128-bit path,
// __launch_bounds__(256, 4)), 77 / 72 (fp16/bf16, 128-bit path, (256, 3)), 80 / 80 (scalar path, (256, 3));
// finalize 32-34 / 32; 0 bytes stack, 0 spills. With 256 threads and <= 35 KiB dynamic shared memory that is 4 CTAs
// per SM (fp32 packs: registers and, on sm_80's 164 KiB, shared memory) or 3 (by registers). With 4 x 4 register
// tiles every FMA costs 0.5 shared-memory words, so K = 15 should be near the HBM floor and K = 64 shared-memory
// bound (an estimate from these counts; not measured: no GPU was available).
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int kTile = 4;                    // register tile: 4 x 4 products per thread per column
constexpr int kBlockRows = 64;              // rows of one row block
constexpr int64_t kStageFloats = 8192;      // 32 KiB staged per chunk
constexpr int64_t kTargetCtas = 1024;       // slices x block pairs aimed at: fills any current GPU several waves deep
constexpr int64_t kMaxPartialBytes = 1 << 27;

// Block pair index p -> (bi, bj), bi <= bj, of nb row blocks.
__device__ __forceinline__ void block_pair(int p, int nb, int& bi, int& bj) {
  int I = 0;
  while (p >= nb - I) {
    p -= nb - I;
    ++I;
  }
  bi = I;
  bj = I + p;
}

// Columns [0, N) of G; with VEC > 1 the launcher passes N = a multiple of VEC (whole packs only: no per-element
// bounds branch in the staging loop) and gram_finalize_kernel adds the last columns.
// Min CTAs per SM (the register cap: 65536 / (256 * min)): 4 (64 registers) for fp32 packs, which fit there; 3
// (85) otherwise, so that ptxas keeps acc64 in registers (left to itself on sm_80 it chose 64 registers for the
// 16-bit packs and spilled two of the accumulators, 32 bytes, at every chunk).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 && VEC > 1 ? 4 : 3) gram_partial_kernel(const T* __restrict__ G, int K, int64_t N,
                                                                   int64_t s0, int64_t s1, int64_t cols_per_slice,
                                                                   int chunk, int stride_s,
                                                                   double* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int nb = (K + kBlockRows - 1) / kBlockRows;
  int bi, bj;
  block_pair(blockIdx.y, nb, bi, bj);
  const bool diag = bi == bj;
  const int rows_i = min(kBlockRows, K - bi * kBlockRows), rows_j = min(kBlockRows, K - bj * kBlockRows);
  const int pad_i = (rows_i + kTile - 1) / kTile * kTile, pad_j = (rows_j + kTile - 1) / kTile * kTile;
  const int staged = diag ? pad_i : pad_i + pad_j;  // staged row r: block i rows, then block j rows, zero padded
  const int Pi = pad_i / kTile, Pj = pad_j / kTile;
  const int ntiles = diag ? Pi * (Pi + 1) / 2 : Pi * Pj;
  // Threads of one tile take consecutive columns: a warp reads consecutive words of the same rows.
  const int ngroups = kThreads / ntiles;
  const int tile = threadIdx.x / ngroups, group = threadIdx.x % ngroups;
  const bool active = tile < ntiles;
  int oi = 0, oj = 0;
  if (active) {
    if (diag) {
      int t = tile, I = 0;
      while (t >= Pi - I) {
        t -= Pi - I;
        ++I;
      }
      oi = I * kTile;
      oj = (I + t) * kTile;
    } else {
      oi = (tile / Pj) * kTile;
      oj = pad_i + (tile % Pj) * kTile;
    }
  }
  double acc64[kTile][kTile] = {};
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * cols_per_slice;
  const int64_t c_end = min(N, c_begin + cols_per_slice);
  const int vecs_log2 = __ffs(chunk / VEC) - 1;  // chunk and VEC are powers of two
  const int vecs_mask = (1 << vecs_log2) - 1;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
    const int w = static_cast<int>(c_end - c0 < chunk ? c_end - c0 : chunk);
    __syncthreads();  // the previous chunk has been consumed
    for (int e = threadIdx.x; e < (staged << vecs_log2); e += kThreads) {
      const int r = e >> vecs_log2, q = (e & vecs_mask) * VEC;
      const bool in_i = r < pad_i;
      const int local = in_i ? r : r - pad_i;
      const int64_t row = (in_i ? bi : bj) * static_cast<int64_t>(kBlockRows) + local;
      float v[VEC];
      // w is a multiple of VEC: a pack is wholly inside the chunk or wholly past it.
      if (local < (in_i ? rows_i : rows_j) && q < w) {
        if constexpr (VEC > 1) {
          load_pack<T, VEC>(G + row * s0 + (c0 + q), v);  // aligned (checked by the launcher): one 128-bit load
        } else {
          v[0] = static_cast<float>(G[row * s0 + (c0 + q) * s1]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s[r * stride_s + q + k] = v[k];
    }
    __syncthreads();
    if (active) {
      float acc[kTile][kTile] = {};
      const float* a = s + oi * stride_s;
      const float* b = s + oj * stride_s;
      for (int col = group; col < w; col += ngroups) {
        float x[kTile], y[kTile];
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
          x[r] = a[r * stride_s + col];
          y[r] = b[r * stride_s + col];
        }
#pragma unroll
        for (int i = 0; i < kTile; ++i)
#pragma unroll
          for (int j = 0; j < kTile; ++j) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < kTile; ++i)
#pragma unroll
        for (int j = 0; j < kTile; ++j) acc64[i][j] += acc[i][j];
    }
  }
  // Sum the groups of each tile in group order (fixed: deterministic) through shared memory.
  __syncthreads();
  double* red = reinterpret_cast<double*>(smem_raw);  // [kThreads][16], fits: the launcher sizes smem for it
  if (active) {
#pragma unroll
    for (int e = 0; e < kTile * kTile; ++e) red[threadIdx.x * kTile * kTile + e] = acc64[e / kTile][e % kTile];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ntiles * kTile * kTile; idx += kThreads) {
    const int t = idx / (kTile * kTile), e = idx % (kTile * kTile);
    double sum = 0.0;
    for (int g = 0; g < ngroups; ++g) sum += red[(t * ngroups + g) * kTile * kTile + e];
    // Entry (i, j) of Gamma this sum belongs to; the threads of tile t found the same offsets.
    int ti, tj;
    if (diag) {
      int u = t, I = 0;
      while (u >= Pi - I) {
        u -= Pi - I;
        ++I;
      }
      ti = I * kTile;
      tj = (I + u) * kTile;
    } else {
      ti = (t / Pj) * kTile;
      tj = (t % Pj) * kTile;
    }
    const int i = bi * kBlockRows + ti + e / kTile, j = bj * kBlockRows + tj + e % kTile;
    if (i < K && j < K && i <= j)
      partial[static_cast<int64_t>(blockIdx.x) * K * K + static_cast<int64_t>(i) * K + j] = sum;
  }
}

// One thread per upper entry (i <= j): sum over slices in fp64, in slice order, then the columns [tail, N) the
// partial kernel left out (fewer than one pack, exact fp64 products), and write both entries.
template <typename T>
__global__ void gram_finalize_kernel(const double* __restrict__ partial, int slices, int K,
                                     const T* __restrict__ G, int64_t s0, int64_t s1, int64_t tail, int64_t N,
                                     float* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(K) * K) return;
  const int i = static_cast<int>(idx / K), j = static_cast<int>(idx % K);
  if (j < i) return;
  double s = 0.0;
  for (int sl = 0; sl < slices; ++sl) s += partial[static_cast<int64_t>(sl) * K * K + idx];
  for (int64_t n = tail; n < N; ++n)
    s += static_cast<double>(static_cast<float>(G[i * s0 + n * s1])) * static_cast<float>(G[j * s0 + n * s1]);
  out[static_cast<int64_t>(i) * K + j] = static_cast<float>(s);
  out[static_cast<int64_t>(j) * K + i] = static_cast<float>(s);
}

}  // namespace

at::Tensor gram_cuda(const at::Tensor& G) {
  constexpr const char* op = "gmd_ext::gram";
  check_G(op, G, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t K = G.size(0), N = G.size(1);
  // The [slices, K, K] fp64 partial buffer needs at least one slice: K^2 * 8 bytes <= kMaxPartialBytes.
  TORCH_CHECK_VALUE(K <= 4096, op, ": the CUDA kernel supports K <= 4096 objectives, got K = ", K);
  at::Tensor out = at::zeros({K, K}, G.options().dtype(at::kFloat));
  if (K == 0 || N == 0) return out;
  const int nb = static_cast<int>((K + kBlockRows - 1) / kBlockRows);
  const int pairs = nb * (nb + 1) / 2;
  const int staged = nb == 1 ? static_cast<int>((K + kTile - 1) / kTile * kTile) : 2 * kBlockRows;
  int chunk = 1024;
  while (chunk > 32 && static_cast<int64_t>(staged) * chunk > kStageFloats) chunk /= 2;
  const int stride_s = chunk + 4;  // + 4 words: rows of one warp's tiles start in different banks, 16-byte aligned
  const size_t smem = std::max<size_t>(static_cast<size_t>(staged) * stride_s * sizeof(float),
                                       static_cast<size_t>(kThreads) * kTile * kTile * sizeof(double));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec_ok = N >= kVec && G.stride(1) == 1 && reinterpret_cast<uintptr_t>(G.const_data_ptr()) % 16 == 0 &&
                        (G.stride(0) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    const int64_t cols = vec_ok ? N / kVec * kVec : N;  // the partial kernel's columns; finalize adds [cols, N)
    const int64_t chunks = (cols + chunk - 1) / chunk;
    const int64_t max_slices = std::max<int64_t>(1, kMaxPartialBytes / (K * K * 8));
    const int64_t slices = std::min({std::max<int64_t>(1, kTargetCtas / pairs), chunks, max_slices, int64_t{65535}});
    const int64_t cols_per_slice = (chunks + slices - 1) / slices * chunk;
    const int64_t used = (cols + cols_per_slice - 1) / cols_per_slice;
    at::Tensor partial = at::empty({used, K, K}, G.options().dtype(at::kDouble));
    const dim3 grid(static_cast<unsigned>(used), static_cast<unsigned>(pairs));
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, smem, stream>>>(G.const_data_ptr<T>(), static_cast<int>(K), cols, G.stride(0),
                                               G.stride(1), cols_per_slice, chunk, stride_s,
                                               partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec_ok) {
      launch(gram_partial_kernel<T, kVec>);
    } else {
      launch(gram_partial_kernel<T, 1>);
    }
    const int64_t entries = K * K;
    gram_finalize_kernel<T><<<static_cast<unsigned>((entries + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), static_cast<int>(used), static_cast<int>(K), G.const_data_ptr<T>(),
        G.stride(0), G.stride(1), cols, N, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) { m.impl("gram", &gmd_ext::cuda::gram_cuda); }
