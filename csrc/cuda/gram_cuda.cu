// gram(G [K, N]) -> G G^T [K, K] fp32, CUDA: pass 1 of the GMD projection (docs/design.md).
//
// Rows are cut into blocks of 64; CTA (slice, block pair) stages a chunk of columns of both row blocks (one for
// a diagonal pair) in shared memory and computes every 4 x 4 tile of the pair from it, so G is read from DRAM
// once (K <= 64: one block pair, every CTA computes all of Gamma). Staging, by load path:
//   fp32, rows unit-stride and 16-byte aligned (gmd_ext.ops.padded_rows gives such buffers): cp.async 16-byte
//     copies (sm_80+) into two buffers, so the next chunk is in flight while this one is multiplied;
//   fp16/bf16 packs: 128-bit loads converted to fp32, stored with 128-bit shared stores laid out conflict-free;
//   anything else: scalar loads and stores.
// The vector paths stage whole packs only and the finalize kernel adds the last N % VEC columns. With one thread
// per tile (K > 60) each thread starts its columns at a tile-dependent offset (8-way bank conflicts otherwise).
// Each thread accumulates at most one chunk (<= 1024 columns / threads per tile) in fp32, then folds into fp64,
// so the fp32 error does not grow with N. The finalize kernel adds the fp64 partials over slices, one warp per
// entry, in a fixed order (lanes over slices, then a fixed lane tree).
//
// The slice count is a function of K, N and the load path (cp.async, 128-bit or scalar) only, never of the device:
// the result is bit-identical on every GPU.
//
// Resources (nvcc 13.0 -Xptxas -v, without --use_fast_math, measured by .ci/compile_cuda.sh; checked by
// tests/test_gpu.py::test_cuda_resources, which also reads LDGSTS (cp.async) and STS.128 in the SASS), registers
// sm_80 / sm_90: gram_partial_kernel 80 / 79-80 (__launch_bounds__(256, 3)), finalize 32 / 32; 0 bytes stack,
// 0 spills. Shared memory <= 37 KiB per CTA: 3 CTAs (24 warps) per SM, by registers.
//
// Expected fraction of a device-to-device copy on an H100 SXM (an estimate from these counts and the SASS: nothing
// ran on a GPU). Per SM the copy moves ~13 bytes per cycle (~3.0 TB/s over 132 SMs at ~1.7 GHz), so a 16 KiB
// chunk (every configuration stages 16 KiB per buffer) arrives every ~1200 cycles.
//   K = 15 fp32 (16 rows x 256 columns, 10 tiles x 25 threads): per chunk and CTA ~580 issue cycles (8 warps x
//     ~82 LDS + 164 FFMA + staging per thread, 4 schedulers) and ~1050 shared-memory cycles (82 LDS per thread,
//     1.4-1.6 ways by a model of the bank mapping): memory-bound with little slack; with the finalize (~2-3 us:
//     one warp per entry, ~32 loads per lane, 8 in flight, against 15-25 us for one thread walking ~1000
//     slices) and the launch gaps, ~65-80 % of the copy at N = 3.25 M (65 us at the floor). The >= 80 % target may
//     be missed by a few points; gpu_check measures it.
//   K = 15 bf16: half the bytes per chunk's products: shared-memory bound, ~50-60 %.
//   K = 64 fp32 (64 x 64, 136 one-thread tiles, 4.25 active warps): 512 LDS + 1024 FFMA per thread per chunk,
//     ~1.6 ways: ~3500 shared-memory cycles per 1200 of memory, ~30-40 % (was ~10-15 %: 3.8 ways on average, 8 at
//     worst). 4 x 4 register tiles cost 0.5 shared words per FMA; the floor at K = 64 needs 8 x 8 tiles (64 fp64
//     accumulators more per thread: not done).
#include <torch/library.h>

#include "common.cuh"

namespace gmd_ext::cuda {
namespace {

constexpr int kTile = 4;                    // register tile: 4 x 4 products per thread per column
constexpr int kBlockRows = 64;              // rows of one row block
constexpr int64_t kStageFloats = 8192;      // 32 KiB staged per chunk (one buffer; the cp.async path has two of half)
constexpr int64_t kTargetCtas = 1024;       // slices x block pairs aimed at: fills any current GPU several waves deep
constexpr int64_t kMaxPartialBytes = 1 << 27;
constexpr int kWarps = kThreads / 32;

// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, so the next chunk is in flight while
// the current one is multiplied. src_size 0 writes 16 zero bytes (rows or packs past the data).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kHasCpAsync = true;
#else
constexpr bool kHasCpAsync = false;
#endif
__device__ __forceinline__ void cp_async16(float* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// A 128-bit shared store in PTX: left to the compiler, a float4 store of selected halves was split into 4 scalar
// stores (nvcc 13.0, sm_80 and sm_90; the same as the global stores in common.cuh). dst is 16-byte aligned.
__device__ __forceinline__ void sts128(float* dst, float a, float b, float c, float d) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// The fp32 128-bit path stages with cp.async into two buffers (double buffering); the others through registers.
template <typename T, int VEC>
constexpr bool uses_cp_async() {
  return kHasCpAsync && sizeof(T) == 4 && VEC == 4;
}

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
// Min CTAs per SM 3 (the register cap 65536 / (256 * 3) = 85): ptxas keeps acc64 in registers (at 4 CTAs, 64
// registers, it spilled 32-36 bytes per chunk: the cp.async path on sm_80 and sm_90, and before it the 16-bit
// packs on sm_80). 3 CTAs x 8 warps per SM, each with its next chunk in flight (cp.async) or 4+ loads (registers).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 3)
    gram_partial_kernel(const T* __restrict__ G, int K, int64_t N, int64_t s0, int64_t s1, int64_t cols_per_slice,
                        int chunk, int stride_s, double* __restrict__ partial) {
  constexpr bool kAsync = uses_cp_async<T, VEC>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int nb = (K + kBlockRows - 1) / kBlockRows;
  int bi, bj;
  block_pair(blockIdx.y, nb, bi, bj);
  const bool diag = bi == bj;
  const int rows_i = min(kBlockRows, K - bi * kBlockRows), rows_j = min(kBlockRows, K - bj * kBlockRows);
  const int pad_i = (rows_i + kTile - 1) / kTile * kTile, pad_j = (rows_j + kTile - 1) / kTile * kTile;
  const int staged = diag ? pad_i : pad_i + pad_j;  // staged row r: block i rows, then block j rows, zero padded
  const int buf_floats = staged * stride_s;
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

  // Element e of the chunk's staging: staged row r, column q (a pack of VEC), the G row it comes from.
  struct Slot {
    int r, q;
    bool valid;
    int64_t row;
  };
  const auto slot = [&](int e, int w) {
    const int r = e >> vecs_log2, q = (e & vecs_mask) * VEC;
    const bool in_i = r < pad_i;
    const int local = in_i ? r : r - pad_i;
    // w is a multiple of VEC: a pack is wholly inside the chunk or wholly past it.
    return Slot{r, q, local < (in_i ? rows_i : rows_j) && q < w,
                (in_i ? bi : bj) * static_cast<int64_t>(kBlockRows) + local};
  };
  const auto width = [&](int64_t c0) { return static_cast<int>(c_end - c0 < chunk ? c_end - c0 : chunk); };

  // Register staging (16-bit packs, scalar path, GPUs without cp.async): a 128-bit load, converted to fp32, stored
  // with 128-bit shared stores. Consecutive threads own consecutive packs of a row, so one quarter-warp's
  // 16-byte stores cover 128 contiguous bytes (fp32: conflict-free); a 16-bit pack is 32 bytes of fp32, so lanes
  // i and i + 4 of a quarter-warp would hit the same banks: lanes with bit 2 set store their high half first.
  const auto stage_registers = [&](int64_t c0, int w, float* buf) {
    for (int e = threadIdx.x; e < (staged << vecs_log2); e += kThreads) {
      const Slot sl = slot(e, w);
      float v[VEC];
      if (sl.valid) {
        if constexpr (VEC > 1) {
          load_pack<T, VEC>(G + sl.row * s0 + (c0 + sl.q), v);  // aligned (checked by the launcher)
        } else {
          v[0] = static_cast<float>(G[sl.row * s0 + (c0 + sl.q) * s1]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = 0.f;
      }
      float* dst = buf + sl.r * stride_s + sl.q;
      if constexpr (VEC == 4) {
        sts128(dst, v[0], v[1], v[2], v[3]);
      } else if constexpr (VEC == 8) {
        if ((threadIdx.x >> 2) & 1) {
          sts128(dst + 4, v[4], v[5], v[6], v[7]);
          sts128(dst, v[0], v[1], v[2], v[3]);
        } else {
          sts128(dst, v[0], v[1], v[2], v[3]);
          sts128(dst + 4, v[4], v[5], v[6], v[7]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dst[k] = v[k];
      }
    }
  };
  const auto stage_async = [&](int64_t c0, int w, float* buf) {
    for (int e = threadIdx.x; e < (staged << vecs_log2); e += kThreads) {
      const Slot sl = slot(e, w);
      cp_async16(buf + sl.r * stride_s + sl.q, sl.valid ? static_cast<const void*>(G + sl.row * s0 + (c0 + sl.q))
                                                        : static_cast<const void*>(G), sl.valid);
    }
  };
  // 4 x 4 products per column of the tile's rows. With one thread per tile (K > 60: 136+ tiles) the threads of a
  // warp would read one column of up to 16 rows whose starts are 4 rows apart (8-way bank conflicts with the +4
  // padding); each then starts at a column set by its tile (oj / 4): at most 3-way, 1.6 on average (by a model
  // of the bank mapping). Only the order of the fp32 sums changes, fixed per tile: deterministic.
  const auto multiply = [&](const float* buf, int w) {
    if (!active) return;
    float acc[kTile][kTile] = {};
    const float* a = buf + oi * stride_s;
    const float* b = buf + oj * stride_s;
    const auto column = [&](int col) {
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
    };
    if (ngroups == 1) {
      const int rot = (oj / kTile) % w;
      for (int i = 0; i < w; ++i) {
        const int col = i + rot;
        column(col < w ? col : col - w);
      }
    } else {
      for (int col = group; col < w; col += ngroups) column(col);
    }
#pragma unroll
    for (int i = 0; i < kTile; ++i)
#pragma unroll
      for (int j = 0; j < kTile; ++j) acc64[i][j] += acc[i][j];
  };

  if constexpr (kAsync) {
    // Double buffering: chunk it + 1 is copied into the other buffer while chunk it is multiplied.
    if (c_begin < c_end) stage_async(c_begin, width(c_begin), s);
    cp_async_commit();
    int it = 0;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk, ++it) {
      const int64_t next = c0 + chunk;
      if (next < c_end) stage_async(next, width(next), s + ((it + 1) & 1) * buf_floats);
      cp_async_commit();  // an empty group at the last chunk keeps the wait count uniform
      cp_async_wait<1>();  // every group but the newest is complete: chunk it has landed (this thread's copies)
      __syncthreads();     // ... and every other thread's
      multiply(s + (it & 1) * buf_floats, width(c0));
      __syncthreads();  // chunk it is consumed before its buffer is refilled (by the copy issued next iteration)
    }
    cp_async_wait<0>();
  } else {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
      __syncthreads();  // the previous chunk has been consumed
      stage_registers(c0, width(c0), s);
      __syncthreads();
      multiply(s, width(c0));
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

// One warp per upper entry (i <= j): lane l sums slices l, l + 32, ... in order (8 loads in flight), then a fixed
// lane tree (deterministic); lane 0 adds the columns [tail, N) the partial kernel left out (fewer than one pack,
// exact fp64 products) and writes both entries. (One thread per entry walked ~1000 slices serially: 15-25 us of a
// ~58 us Gramian at K = 15, N = 3.25 M by the review's estimate.)
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_finalize_kernel(const double* __restrict__ partial, int slices,
                                                                 int K, const T* __restrict__ G, int64_t s0,
                                                                 int64_t s1, int64_t tail, int64_t N,
                                                                 float* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (idx >= static_cast<int64_t>(K) * K) return;  // uniform per warp
  const int i = static_cast<int>(idx / K), j = static_cast<int>(idx % K);
  if (j < i) return;
  double s = 0.0;
#pragma unroll 8
  for (int sl = lane; sl < slices; sl += 32) s += partial[static_cast<int64_t>(sl) * K * K + idx];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane != 0) return;
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec_ok = N >= kVec && G.stride(1) == 1 && reinterpret_cast<uintptr_t>(G.const_data_ptr()) % 16 == 0 &&
                        (G.stride(0) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    // The cp.async path double-buffers: two buffers of half the columns, the same shared memory in all.
    const int buffers = vec_ok && uses_cp_async<T, kVec>() ? 2 : 1;
    int chunk = 1024;
    while (chunk > 32 && static_cast<int64_t>(staged) * chunk * buffers > kStageFloats) chunk /= 2;
    const int stride_s = chunk + 4;  // + 4 words: rows of a warp's tiles start in different banks, 16-byte aligned
    const size_t smem = std::max<size_t>(static_cast<size_t>(buffers) * staged * stride_s * sizeof(float),
                                         static_cast<size_t>(kThreads) * kTile * kTile * sizeof(double));
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
    gram_finalize_kernel<T><<<static_cast<unsigned>((entries + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), static_cast<int>(used), static_cast<int>(K), G.const_data_ptr<T>(),
        G.stride(0), G.stride(1), cols, N, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace gmd_ext::cuda

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) { m.impl("gram", &gmd_ext::cuda::gram_cuda); }
