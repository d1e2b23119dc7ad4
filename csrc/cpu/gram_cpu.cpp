// gram(G [K, N]) -> G G^T [K, K] fp32, CPU: pass 1 of the GMD projection (docs/design.md).
//
// G is cut into blocks of columns that stay in L2. Per block, the upper triangle of the block Gramian is
// computed with register tiles of T x T row pairs (each vector of a row is loaded once per tile and feeds T
// FMAs), in fp32; block results are accumulated in fp64. Blocks are grouped into a fixed number of chunks
// that depends only on (K, N), and chunk sums are added in order, so the result does not depend on the
// number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace gmd_ext::cpu {
namespace {

// Rows of the next block to pull into L2 while this tile computes (see gram_block).
struct Prefetch {
  const char* const* rows = nullptr;
  int count = 0;
  int64_t elem_bytes = 0;
};

// Dot products of TI rows `a` with TJ rows `b` over B columns -> out[i * ldo + j] for i < ti, j < tj (the
// rows beyond are zero padding of the last tile). With DIAG (a == b, TI == TJ) only j >= i is computed.
template <int W, int TI, int TJ, bool DIAG>
GMD_INLINE void dot_tile(const float* const* a, const float* const* b, int64_t B, float* out, int64_t ldo, int ti,
                         int tj, Prefetch pf) {
  using V = vfloat<W>;
  V acc[TI][TJ];
#pragma GCC unroll 8
  for (int i = 0; i < TI; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < TJ; ++j) acc[i][j] = V{};
  int64_t n = 0;
  for (; n + W <= B; n += W) {
    for (int p = 0; p < pf.count; ++p) __builtin_prefetch(pf.rows[p] + n * pf.elem_bytes, 0, 2);
    V x[TI], y[TJ];
#pragma GCC unroll 8
    for (int i = 0; i < TI; ++i) x[i] = load_float<W>(a[i] + n);
    if constexpr (!DIAG) {
#pragma GCC unroll 8
      for (int j = 0; j < TJ; ++j) y[j] = load_float<W>(b[j] + n);
    }
#pragma GCC unroll 8
    for (int i = 0; i < TI; ++i)
#pragma GCC unroll 8
      for (int j = DIAG ? i : 0; j < TJ; ++j) acc[i][j] += x[i] * (DIAG ? x[j] : y[j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < TI; ++i)
#pragma GCC unroll 8
    for (int j = DIAG ? i : 0; j < TJ; ++j) {
      if (i >= ti || j >= tj) continue;
      float s = hsum<W>(acc[i][j]);
      for (int64_t m = n; m < B; ++m) s += a[i][m] * b[j][m];
      out[i * ldo + j] = s;
    }
}

// Upper triangle of rows[0..K) . rows[0..K)^T over B columns -> part [K, K] (row-major, fp32), in T x T
// tiles; `rows` is padded to a multiple of T with pointers to zeros, so only two tile shapes are compiled
// per ISA (one instantiation per (ti, tj) pair made gram_cpu.cpp the build's critical path at 2.5 min).
// Only the tiles of the first tile row touch memory for the first time, so without help the block's DRAM
// traffic and most of its FMAs do not overlap (measured: single-core time = floor + compute). Each tile
// therefore prefetches a share of the next block's rows (`next`, K pointers, may be null) into L2.
template <int W, int T>
GMD_INLINE void gram_block(const float* const* rows, int64_t K, int64_t B, float* part, const char* const* next,
                           int64_t next_elem_bytes) {
  const int64_t P = (K + T - 1) / T, ntiles = P * (P + 1) / 2;
  const int64_t per_tile = next ? (K + ntiles - 1) / ntiles : 0;
  int64_t tile = 0;
  auto prefetch_for = [&](int64_t t) {
    Prefetch pf;
    const int64_t first = std::min(K, t * per_tile);
    pf.rows = next ? next + first : nullptr;
    pf.count = static_cast<int>(std::min(K, first + per_tile) - first);
    pf.elem_bytes = next_elem_bytes;
    return pf;
  };
  for (int64_t i0 = 0; i0 < K; i0 += T) {
    const int ti = static_cast<int>(std::min<int64_t>(T, K - i0));
    dot_tile<W, T, T, true>(rows + i0, rows + i0, B, part + i0 * K + i0, K, ti, ti, prefetch_for(tile++));
    for (int64_t j0 = i0 + T; j0 < K; j0 += T) {
      const int tj = static_cast<int>(std::min<int64_t>(T, K - j0));
      dot_tile<W, T, T, false>(rows + i0, rows + j0, B, part + i0 * K + j0, K, ti, tj, prefetch_for(tile++));
    }
  }
}

// Tile sizes: T x T accumulators + T loaded vectors (+1 streamed) must fit the register file. AVX-512 (32 zmm)
// has T = 4 and 5, whichever pads K less (T = 5 took 0.87x the time of T = 4 at K = 15, N = 8M fp32 on the
// 2-core AMD EPYC dev box); AVX2 and the baseline (16 registers) use T = 3.
#ifdef GMD_X86
GMD_TARGET_AVX512 void gram_block_avx512(const float* const* rows, int64_t K, int64_t B, float* part,
                                         const char* const* next, int64_t next_elem_bytes, int tile) {
  if (tile == 5) return gram_block<16, 5>(rows, K, B, part, next, next_elem_bytes);
  gram_block<16, 4>(rows, K, B, part, next, next_elem_bytes);
}
GMD_TARGET_AVX2 void gram_block_avx2(const float* const* rows, int64_t K, int64_t B, float* part,
                                     const char* const* next, int64_t next_elem_bytes, int) {
  gram_block<8, 3>(rows, K, B, part, next, next_elem_bytes);
}
#endif
void gram_block_baseline(const float* const* rows, int64_t K, int64_t B, float* part, const char* const* next,
                         int64_t next_elem_bytes, int) {
  gram_block<4, 3>(rows, K, B, part, next, next_elem_bytes);
}

using GramBlockFn = void (*)(const float* const*, int64_t, int64_t, float*, const char* const*, int64_t, int);

GramBlockFn pick_gram_block(Isa isa) {
#ifdef GMD_X86
  if (isa == Isa::Avx512) return gram_block_avx512;
  if (isa == Isa::Avx2) return gram_block_avx2;
#endif
  return gram_block_baseline;
}

// The tile size gram_block_<isa> uses for K rows: the one with the fewest padded multiply-adds.
int tile_size(Isa isa, int64_t K) {
  if (isa != Isa::Avx512) return 3;
  auto cost = [K](int64_t t) {
    const int64_t P = (K + t - 1) / t;
    return P * (P - 1) / 2 * t * t + P * t * (t + 1) / 2;
  };
  return cost(5) < cost(4) ? 5 : 4;
}

// Columns per block: the block (K rows, fp32) is re-read once per tile row, so it should stay in L2.
int64_t block_columns(int64_t K) {
  const int64_t target_bytes = 256 * 1024;
  const int64_t cols = target_bytes / (4 * std::max<int64_t>(K, 1));
  return std::clamp<int64_t>(cols / 64 * 64, 256, 16384);
}

constexpr int64_t kMaxChunks = 256;  // fixed, thread-count-independent grouping of blocks (determinism)

template <typename T>
void gram_kernel(const at::Tensor& G, at::Tensor& out) {
  const int64_t K = G.size(0), N = G.size(1);
  const int64_t s0 = G.stride(0), s1 = G.stride(1);
  const T* base = G.const_data_ptr<T>();
  const int64_t B = block_columns(K);
  const int64_t nblocks = (N + B - 1) / B;
  const int64_t nchunks = std::min(nblocks, kMaxChunks);
  // fp32 with unit column stride is read in place; everything else goes through an fp32 scratch block.
  const bool direct = std::is_same_v<T, float> && s1 == 1;
  const Isa isa = cpu_isa();
  const GramBlockFn block_fn = pick_gram_block(isa);
  const int tile = tile_size(isa, K);
  const int64_t K_padded = (K + tile - 1) / tile * tile;
  const LoadBlockFn<T> load_fn = pick_load_block<T>(isa);
  std::vector<double> chunk_sums(nchunks * K * K, 0.0);

  at::parallel_for(0, nchunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> scratch(direct ? 0 : K * B);
    std::vector<float> part(K * K);
    std::vector<float> zeros(B, 0.f);
    std::vector<const float*> rows(K_padded, zeros.data());  // rows >= K stay zero padding
    std::vector<const char*> next(K);
    for (int64_t c = c_begin; c < c_end; ++c) {
      double* acc = chunk_sums.data() + c * K * K;
      const int64_t blk_end = (c + 1) * nblocks / nchunks;
      for (int64_t blk = c * nblocks / nchunks; blk < blk_end; ++blk) {
        const int64_t n0 = blk * B, nb = std::min(B, N - n0);
        const bool has_next = blk + 1 < blk_end && s1 == 1;
        for (int64_t k = 0; has_next && k < K; ++k)
          next[k] = reinterpret_cast<const char*>(base + k * s0 + n0 + B);
        if (direct) {
          for (int64_t k = 0; k < K; ++k) rows[k] = reinterpret_cast<const float*>(base) + k * s0 + n0;
        } else {
          load_fn(base, s0, s1, K, n0, nb, scratch.data(), B);
          for (int64_t k = 0; k < K; ++k) rows[k] = scratch.data() + k * B;
        }
        // Only the last block can be shorter than B, so the next block is never longer than this one and
        // the prefetch loops over this block's columns cover it.
        block_fn(rows.data(), K, nb, part.data(), has_next ? next.data() : nullptr,
                 static_cast<int64_t>(sizeof(T)), tile);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = i; j < K; ++j) acc[i * K + j] += part[i * K + j];
      }
    }
  });

  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i; j < K; ++j) {
      double s = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) s += chunk_sums[c * K * K + i * K + j];
      o[i * K + j] = o[j * K + i] = static_cast<float>(s);
    }
}

}  // namespace

at::Tensor gram_cpu(const at::Tensor& G) {
  TORCH_CHECK_VALUE(G.dim() == 2, "gmd_ext::gram: G must be a 2-D [K, N] tensor, got a ", G.dim(), "-D tensor of shape ",
              G.sizes());
  TORCH_CHECK_TYPE(is_projection_dtype(G.scalar_type()), "gmd_ext::gram: G must be float32, float16 or bfloat16, got ",
              G.scalar_type());
  TORCH_CHECK_VALUE(G.device().is_cpu(), "gmd_ext::gram: G must be a CPU tensor for the CPU kernel, got ", G.device());
  const int64_t K = G.size(0), N = G.size(1);
  at::Tensor out = at::zeros({K, K}, G.options().dtype(at::kFloat));
  if (K == 0 || N == 0) return out;
  switch (G.scalar_type()) {
    case at::kFloat: gram_kernel<float>(G, out); break;
    case at::kHalf: gram_kernel<c10::Half>(G, out); break;
    default: gram_kernel<c10::BFloat16>(G, out); break;
  }
  return out;
}

}  // namespace gmd_ext::cpu

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) { m.impl("gram", &gmd_ext::cpu::gram_cpu); }
