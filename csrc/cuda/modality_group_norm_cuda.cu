// modality_group_norm on CUDA. Task t = (b * M + m) * G + g owns the n = C / G * L elements [t * n, (t + 1) * n) of
// x [B, M, C, L]; row r = (b * M + m) * C + c owns the L elements of one channel. Absent pairs only write zeros.
// Same statistics as csrc/cpu/modality_group_norm_cpu.cpp (csrc/ds_common.h: per-chunk moments of the values scaled by
// a power of two from the chunk's max |x|, merged by Chan's formula: exact from subnormal groups to the dtype's max),
// split so that every kernel fills the GPU whatever B * M * G is. Every kernel
// but the merges has one CTA per chunk of kChunk consecutive elements (chunk_of / for_each_pack: one work
// decomposition, 16 elements per thread in registers, 128-bit loads and stores when the segment length keeps packs
// aligned), so there is no grid-stride loop and no per-element index division:
//
//   forward:  stats   one CTA per (task, chunk): the chunk stays in registers for its three steps (max |x|, scaled
//                     sum, centred scaled squares), writes its moments (count, exponent, mean, M2) in fp64;
//             merge   one warp per task: lanes merge strided chunks in order, then a fixed lane tree: mean, rstd;
//             apply   one CTA per (row, chunk): y = act(x * a + s) with a = rstd * w, s = b - mean * a per row.
//   backward: sums    one CTA per (row, chunk): sum dz and sum dz * xhat, fp64 partials;
//             merge   one warp per task, as the forward's: dbeta, dgamma partials [B, M, C] and the two means of
//                     the GroupNorm backward per task;
//             apply   one CTA per (row, chunk): dx.
// DRAM traffic: the forward reads x once for the statistics and once for the apply and writes y once (3 passes of
// x's bytes against the floor's 2); the backward reads x and dy twice each and writes dx (5 against 3). A pass
// cannot be saved at BraTS shapes ([2, 4, C, 128^3], G = 8): a group is C / 8 x 128^3 values (>= 16 MiB fp32),
// more than an SM cluster holds on chip (16 x 228 KiB), and all of x (1-8.6 GB) is far beyond the 50 MB L2, so the
// normalisation must read x again after the statistics. The apply kernels walk their chunks last to first, so
// their first reads hit what the statistics kernel read last, still in L2 (all of x when it fits there: the
// deeper U-Net levels, where the second read is nearly free). bench/gpu_check.py therefore restates the >= 70 %
// target against the bytes these kernels must move (of_moved); the best fraction of the 2- / 3-pass copy is 2/3
// forward and 3/5 backward.
//
// Expected fraction of a device-to-device copy of the moved bytes on an H100 SXM at BraTS shapes (an estimate
// from the resources below and the SASS: nothing ran on a GPU). Little's law wants ~16 KiB in flight per SM (~3.0
// TB/s x ~0.7 us / 132 SMs). stats: 4 CTAs per SM (<= 62 registers), each 16 KiB of loads issued at once, then
// three block reductions (~300 cycles each) with no load in flight: loading ~45 % of a CTA's life, ~29 KiB in
// flight per SM: ~80 %. apply / backward apply: streaming 128-bit loads and stores, 16 elements per thread, no
// reduction: ~85-90 %. backward sums: two streams, one reduction: ~80-85 %. merges: one warp per task, chunks / 32
// + 5 dependent merges (a BraTS task has 512-8192 chunks: a few us; one thread walking them serially with two fp64
// divides per step cost ~0.34 ms of ~0.96 ms at BraTS shapes by the review's estimate). Forward ~80-85 % of the
// moved bytes (~0.55 of the 2-pass copy), backward ~80-85 % (~0.5 of the 3-pass copy).
// Chunk counts depend on the shape only, and every merge runs in a fixed order: results are bit-identical on any
// GPU and deterministic (no atomics).
//
// Resources (nvcc 13.0 -Xptxas -v, without --use_fast_math, measured by .ci/compile_cuda.sh; checked by
// tests/test_gpu.py::test_cuda_resources), registers over dtypes (fp64 included) and activations, sm_80 / sm_90:
// stats 42-59 / 42-59, apply 30-52 / 31-54, backward sums 32-94 / 32-80 (94: fp64 on sm_80), backward apply
// 32-80 / 32-80, merges 46-48 / 46-48; 0 bytes stack, 0 spills at 256 threads (__launch_bounds__). With <= 80
// registers (fp32 / 16-bit: <= 62 for stats and apply) and no shared memory beyond CUB's reductions, 3-4 CTAs
// (24-32 warps) of these one-chunk CTAs are resident per SM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../ds_common.h"
#include "common.cuh"

#include <array>

namespace gmd_ext {

namespace {

using cuda::kThreads;
using cuda::load_pack;
using cuda::store_pack;

constexpr int kElems = 16;                     // elements per thread of a chunk, held in registers
constexpr int64_t kChunk = kThreads * kElems;  // 4096 elements: the unit of work of every CTA of every kernel

using BlockReduce = cub::BlockReduce<double, kThreads>;

// Block-wide fp64 sums of two values; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b, typename BlockReduce::TempStorage& tmp) {
  a = BlockReduce(tmp).Sum(a);
  __syncthreads();
  b = BlockReduce(tmp).Sum(b);
}

// The one work decomposition of this file. Every kernel's CTA owns one chunk of kChunk consecutive elements of a
// segment (a task for the forward statistics, a row for everything else); thread i owns the kElems / VEC packs
// at offsets (j * kThreads + i) * VEC, j = 0 .. kElems / VEC - 1: a warp's packs are contiguous (coalesced 128-bit
// accesses) and a thread's packs are independent loads, all issued before the first use. Segment lengths are
// multiples of VEC (pack_width), so a pack is either wholly inside the chunk's `count` elements or wholly past it.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_pack(int count, F&& f) {
#pragma unroll
  for (int j = 0; j < kElems / VEC; ++j) {
    const int off = (j * kThreads + static_cast<int>(threadIdx.x)) * VEC;
    f(j * VEC, off, off < count);
  }
}

// Which (segment, chunk) CTA blockIdx.x owns, of `segments` segments of `len` elements, and the chunk's extent.
// reverse: the last chunk first. The apply kernels run in reverse after their statistics kernels ran forward, so
// their first reads are the data those just read, still in L2 (all of it when x fits there).
struct Chunk {
  int64_t seg, begin;
  int count;
};
__device__ __forceinline__ Chunk chunk_of(int64_t len, bool reverse) {
  // 32-bit division: the grid has < 2^31 CTAs (chunk_grid), so the CTA index and the chunk count fit.
  const unsigned chunks = static_cast<unsigned>((len + kChunk - 1) / kChunk);
  const unsigned id = reverse ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t begin = static_cast<int64_t>(id % chunks) * kChunk;
  return {static_cast<int64_t>(id / chunks), begin, static_cast<int>(min(kChunk, len - begin))};
}

// This thread's kElems elements of chunk ch of p (segment base), zero past the chunk's count.
template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* p, const Chunk& ch, acc_t (&v)[kElems]) {
  for_each_pack<VEC>(ch.count, [&](int e, int off, bool in) {
    acc_t pack[VEC];
    if (in) {
      load_pack<scalar_t, VEC>(p + ch.begin + off, pack);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) pack[k] = acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[e + k] = pack[k];
  });
}

template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* p, const Chunk& ch, const acc_t (&v)[kElems]) {
  for_each_pack<VEC>(ch.count, [&](int e, int off, bool in) {
    if (!in) return;
    acc_t pack[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack[k] = v[e + k];
    store_pack<scalar_t, VEC>(p + ch.begin + off, pack);
  });
}

// Grid of the chunk decomposition: one CTA per chunk of every segment.
unsigned chunk_grid(int64_t segments, int64_t len, const char* op, at::IntArrayRef sizes) {
  const int64_t ctas = segments * ((len + kChunk - 1) / kChunk);
  TORCH_CHECK_VALUE(ctas <= 2147483647LL, op, ": x is too large for the CUDA kernel (", sizes, ")");
  return static_cast<unsigned>(ctas);
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};

// One CTA per (task, chunk): the chunk's moments (csrc/ds_common.h: count, exponent e of its max |x|, mean and M2 of
// the values scaled by 2^-e) in fp64. The chunk stays in registers for its three steps (max, scaled sum for the
// centre, centred scaled sums).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(const scalar_t* __restrict__ x,
                                                            const bool* __restrict__ present, int64_t G, int64_t n,
                                                            double* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  using AccReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ typename AccReduce::TempStorage tmp_max;
  __shared__ acc_t centre;
  __shared__ int exponent;
  const Chunk ch = chunk_of(n, false);
  double* out = part + static_cast<int64_t>(blockIdx.x) * 4;  // [task, chunk] order: blockIdx.x
  if (!present[ch.seg / G]) {
    if (threadIdx.x == 0) {
      out[0] = out[2] = out[3] = 0.0;
      out[1] = kGnZeroExponent;
    }
    return;
  }
  const int count = ch.count;
  acc_t v[kElems];
  load_chunk<scalar_t, VEC>(x + ch.seg * n, ch, v);  // zeros past count
  acc_t mx = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) mx = MaxOp{}(mx, v[e] < 0 ? -v[e] : v[e]);
  mx = AccReduce(tmp_max).Reduce(mx, MaxOp{});
  if (threadIdx.x == 0) exponent = gn_exponent(mx);
  __syncthreads();
  const int ex = exponent;
  const GnScale<acc_t> sc = gn_scale<acc_t>(ex);
  acc_t sum = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    v[e] = sc(v[e]);
    sum += v[e];
  }
  const double total = BlockReduce(tmp).Sum(static_cast<double>(sum));
  if (threadIdx.x == 0) centre = static_cast<acc_t>(total / count);
  __syncthreads();
  const acc_t c = centre;
  acc_t sd = 0, sd2 = 0;
  for_each_pack<VEC>(count, [&](int e0, int, bool in) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t d = in ? v[e0 + k] - c : acc_t(0);
      sd += d;
      sd2 += d * d;
    }
  });
  double a = sd, b = sd2;
  block_sum2(a, b, tmp);
  if (threadIdx.x == 0) {
    const GnMoments m = gn_chunk_moments(count, ex, c, a, b);
    out[0] = m.count;
    out[1] = m.exponent;
    out[2] = m.mean;
    out[3] = m.m2;
  }
}

constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ GnMoments shfl_down(const GnMoments& m, int off) {
  return {__shfl_down_sync(0xffffffffu, m.count, off), __shfl_down_sync(0xffffffffu, m.exponent, off),
          __shfl_down_sync(0xffffffffu, m.mean, off), __shfl_down_sync(0xffffffffu, m.m2, off)};
}

// One warp per task: lane l merges chunks l, l + 32, ... in order, then the lanes merge in a fixed tree (lane 0
// ends with the task's moments): a fixed order, so the result is deterministic, with a dependent chain of
// chunks / 32 + 5 merges instead of the chunk count.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gn_merge_kernel(const double* __restrict__ part, int64_t tasks,
                                                            int64_t chunks, double eps, acc_t* __restrict__ mean,
                                                            acc_t* __restrict__ rstd) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= tasks) return;  // uniform per warp
  const double* p = part + t * chunks * 4;
  GnMoments m{0.0, static_cast<double>(kGnZeroExponent), 0.0, 0.0};
  for (int64_t s = lane; s < chunks; s += 32) m = gn_merge(m, {p[4 * s], p[4 * s + 1], p[4 * s + 2], p[4 * s + 3]});
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const GnMoments o = shfl_down(m, off);
    if (lane + off < 32) m = gn_merge(m, o);
  }
  if (lane == 0) {
    const GnStats st = gn_finalize(m, eps);
    mean[t] = static_cast<acc_t>(st.mean);
    rstd[t] = static_cast<acc_t>(st.rstd);
  }
}

// Row r's task and modality channel.
struct RowInfo {
  int64_t task, channel, pair;
};
__device__ __forceinline__ RowInfo row_info(int64_t r, int64_t M, int64_t C, int64_t G) {
  const int64_t pair = r / C, c = r % C;
  return {pair * G + c / (C / G), (pair % M) * C + c, pair};
}

// y = act(x * a + s) per row, a = rstd * w and s = b - mean * a; absent pairs write zeros without reading x.
template <typename scalar_t, typename acc_t, Activation A, int VEC>
__global__ void __launch_bounds__(kThreads) gn_apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                            const acc_t* __restrict__ b,
                                                            const bool* __restrict__ present,
                                                            const acc_t* __restrict__ mean,
                                                            const acc_t* __restrict__ rstd, scalar_t* __restrict__ y,
                                                            int64_t M, int64_t C, int64_t G, int64_t L) {
  const Chunk ch = chunk_of(L, true);
  const RowInfo ri = row_info(ch.seg, M, C, G);
  const bool on = present[ri.pair];
  acc_t v[kElems] = {};
  if (on) {
    const acc_t a = rstd[ri.task] * w[ri.channel];
    const acc_t s = b[ri.channel] - mean[ri.task] * a;
    load_chunk<scalar_t, VEC>(x + ch.seg * L, ch, v);
#pragma unroll
    for (int e = 0; e < kElems; ++e) v[e] = activate<A>(v[e] * a + s);
  }
  store_chunk<scalar_t, VEC>(y + ch.seg * L, ch, v);
}

// Backward pass 1 per (row, chunk of L): sum dz and sum dz * xhat, dz = dy * act'(z).
template <typename scalar_t, typename acc_t, Activation A, int VEC>
__global__ void __launch_bounds__(kThreads) gn_bwd_sums_kernel(const scalar_t* __restrict__ gy,
                                                               const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ w,
                                                               const acc_t* __restrict__ b,
                                                               const bool* __restrict__ present,
                                                               const acc_t* __restrict__ mean,
                                                               const acc_t* __restrict__ rstd, int64_t M, int64_t C,
                                                               int64_t G, int64_t L, double* __restrict__ part) {
  __shared__ typename BlockReduce::TempStorage tmp;
  const Chunk ch = chunk_of(L, false);
  const RowInfo ri = row_info(ch.seg, M, C, G);
  double* out = part + static_cast<int64_t>(blockIdx.x) * 2;  // [row, chunk] order: blockIdx.x
  if (!present[ri.pair]) {
    if (threadIdx.x == 0) out[0] = out[1] = 0.0;
    return;
  }
  const acc_t wc = w[ri.channel], bc = b[ri.channel];
  const GnNormalizer<acc_t> xhat_of = gn_normalizer(mean[ri.task], rstd[ri.task]);  // never forms x - mean
  acc_t xv[kElems], gv[kElems];
  load_chunk<scalar_t, VEC>(x + ch.seg * L, ch, xv);
  load_chunk<scalar_t, VEC>(gy + ch.seg * L, ch, gv);
  acc_t s1 = 0, s2 = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const acc_t xhat = xhat_of(xv[e]);
    const acc_t dz = gv[e] * activate_grad<A>(xhat * wc + bc);
    s1 += dz;  // zero past count: gv is zero there
    s2 += dz * xhat;  // not dz * (x - mean): that overflows fp32 sums for |x| near fp32's max
  }
  double a = s1, c = s2;
  block_sum2(a, c, tmp);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = c;
  }
}

// One warp per task: per channel, the chunks' sums (lane l takes chunks l, l + 32, ... in order, then a fixed lane
// tree: deterministic) -> dbeta, dgamma partials [B, M, C], and the task's two GroupNorm-backward means
// coef[t] = (mean(dxhat), mean(dxhat * xhat)).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gn_bwd_merge_kernel(const double* __restrict__ part,
                                                                const acc_t* __restrict__ w,
                                                                const bool* __restrict__ present, int64_t tasks,
                                                                int64_t M, int64_t C, int64_t G, int64_t L,
                                                                int64_t chunks, acc_t* __restrict__ dgamma,
                                                                acc_t* __restrict__ dbeta, acc_t* __restrict__ coef) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= tasks) return;  // uniform per warp
  const int64_t pair = t / G, g = t % G, Cg = C / G, m = pair % M;
  double sw1 = 0, sw2 = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    const int64_t r = pair * C + g * Cg + c;
    double s1 = 0, s2 = 0;
    for (int64_t s = lane; s < chunks; s += 32) {
      s1 += part[(r * chunks + s) * 2];
      s2 += part[(r * chunks + s) * 2 + 1];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      s1 += __shfl_down_sync(0xffffffffu, s1, off);
      s2 += __shfl_down_sync(0xffffffffu, s2, off);
    }
    if (lane == 0) {
      dbeta[r] = static_cast<acc_t>(s1);
      dgamma[r] = static_cast<acc_t>(s2);
      const double wc = w[m * C + g * Cg + c];
      sw1 += wc * s1;
      sw2 += wc * s2;
    }
  }
  if (lane == 0) {
    const bool on = present[pair];
    const double n = static_cast<double>(Cg * L);
    coef[2 * t] = on ? static_cast<acc_t>(sw1 / n) : acc_t(0);
    coef[2 * t + 1] = on ? static_cast<acc_t>(sw2 / n) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, Activation A, int VEC>
__global__ void __launch_bounds__(kThreads) gn_bwd_apply_kernel(const scalar_t* __restrict__ gy,
                                                                const scalar_t* __restrict__ x,
                                                                const acc_t* __restrict__ w,
                                                                const acc_t* __restrict__ b,
                                                                const bool* __restrict__ present,
                                                                const acc_t* __restrict__ mean,
                                                                const acc_t* __restrict__ rstd,
                                                                const acc_t* __restrict__ coef,
                                                                scalar_t* __restrict__ dx, int64_t M, int64_t C,
                                                                int64_t G, int64_t L) {
  const Chunk ch = chunk_of(L, true);
  const RowInfo ri = row_info(ch.seg, M, C, G);
  const bool on = present[ri.pair];
  acc_t xv[kElems] = {};
  if (on) {
    const acc_t rs = rstd[ri.task], wc = w[ri.channel], bc = b[ri.channel];
    const GnNormalizer<acc_t> xhat_of = gn_normalizer(mean[ri.task], rs);
    const acc_t c1 = coef[2 * ri.task], c2 = coef[2 * ri.task + 1];
    acc_t gv[kElems];
    load_chunk<scalar_t, VEC>(x + ch.seg * L, ch, xv);
    load_chunk<scalar_t, VEC>(gy + ch.seg * L, ch, gv);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const acc_t xhat = xhat_of(xv[e]);
      const acc_t dz = gv[e] * activate_grad<A>(xhat * wc + bc);
      xv[e] = rs * (dz * wc - c1 - xhat * c2);
    }
  }
  store_chunk<scalar_t, VEC>(dx + ch.seg * L, ch, xv);
}

// The 16-byte pack width for scalar_t when `elems` (a row or task length) keeps packs aligned, else 1.
template <typename scalar_t>
int pack_width(const at::Tensor& x, int64_t elems) {
  constexpr int vec = 16 / sizeof(scalar_t);
  return reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 && elems % vec == 0 ? vec : 1;
}

// Calls f with the pack width as a compile-time constant: 16 / sizeof(scalar_t) when vec > 1, else 1.
template <typename scalar_t, typename F>
void dispatch_pack(int vec, F&& f) {
  if (vec > 1) return f(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  return f(std::integral_constant<int, 1>{});
}

void check_cuda_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_group_norm_fwd_cuda(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias,
                                                                            const at::Tensor& present,
                                                                            int64_t num_groups, double eps,
                                                                            c10::string_view activation) {
  const int64_t L = check_group_norm_args(x, weight, bias, present, num_groups);
  const Activation act = parse_activation(activation);
  check_group_norm_eps(eps);
  check_cuda_x("modality_group_norm_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xc = x.contiguous();
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const auto pc = present.contiguous();
  auto y = at::empty_like(xc);
  auto mean = at::empty({x.size(0), x.size(1), num_groups}, x.options().dtype(acc));
  auto rstd = at::empty_like(mean);
  const int64_t tasks = mean.numel();
  if (tasks == 0) return {y, mean, rstd};
  const int64_t C = x.size(2), M = x.size(1), n = C / num_groups * L, rows = tasks / num_groups * C;
  if (n == 0) {
    mean.zero_();
    rstd.zero_();
    return {y, mean, rstd};
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const unsigned stats_ctas = chunk_grid(tasks, n, "modality_group_norm_fwd", x.sizes());
  const unsigned apply_ctas = chunk_grid(rows, L, "modality_group_norm_fwd", x.sizes());
  auto part = at::empty({tasks, chunks, 4}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    {
      dispatch_pack<scalar_t>(pack_width<scalar_t>(xc, n), [&](auto v) {
        gn_stats_kernel<scalar_t, decltype(v)::value><<<stats_ctas, kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<bool>(), num_groups, n, part.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      gn_merge_kernel<acc_t><<<(tasks + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
          part.const_data_ptr<double>(), tasks, chunks, eps, mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int vec = pack_width<scalar_t>(xc, L);
      dispatch_activation(act, [&](auto a) {
        dispatch_pack<scalar_t>(vec, [&](auto v) {
          gn_apply_kernel<scalar_t, acc_t, decltype(a)::value, decltype(v)::value>
              <<<apply_ctas, kThreads, 0, stream>>>(
                  xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                  pc.const_data_ptr<bool>(), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
                  y.mutable_data_ptr<scalar_t>(), M, C, num_groups, L);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_group_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& present, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const int64_t L = check_group_norm_args(x, weight, bias, present, num_groups);
  const Activation act = parse_activation(activation);
  check_group_norm_bwd_args(grad_y, x, mean, rstd, num_groups);
  check_cuda_x("modality_group_norm_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xc = x.contiguous(), gc = grad_y.to(x.scalar_type()).contiguous();
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const auto pc = present.contiguous();
  const auto mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = output_mask[0] ? at::empty_like(xc) : at::Tensor();
  auto dgamma = at::zeros({x.size(0), x.size(1), x.size(2)}, x.options().dtype(acc));
  auto dbeta = at::zeros_like(dgamma);
  const int64_t tasks = mc.numel(), C = x.size(2), M = x.size(1), rows = dgamma.numel();
  if (tasks > 0 && L > 0) {
    const int64_t chunks = (L + kChunk - 1) / kChunk;
    const unsigned ctas = chunk_grid(rows, L, "modality_group_norm_bwd", x.sizes());
    auto part = at::empty({rows, chunks, 2}, x.options().dtype(at::kDouble));
    auto coef = at::empty({tasks, 2}, x.options().dtype(acc));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      {
        const int vec = std::min(pack_width<scalar_t>(xc, L), pack_width<scalar_t>(gc, L));
        dispatch_activation(act, [&](auto a) {
          dispatch_pack<scalar_t>(vec, [&](auto v) {
            gn_bwd_sums_kernel<scalar_t, acc_t, decltype(a)::value, decltype(v)::value>
                <<<ctas, kThreads, 0, stream>>>(
                    gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                    b.const_data_ptr<acc_t>(), pc.const_data_ptr<bool>(), mc.const_data_ptr<acc_t>(),
                    rc.const_data_ptr<acc_t>(), M, C, num_groups, L, part.mutable_data_ptr<double>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
        gn_bwd_merge_kernel<acc_t><<<(tasks + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
            part.const_data_ptr<double>(), w.const_data_ptr<acc_t>(), pc.const_data_ptr<bool>(), tasks, M, C, num_groups, L, chunks, dgamma.mutable_data_ptr<acc_t>(),
            dbeta.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (dx.defined()) {
          dispatch_activation(act, [&](auto a) {
            dispatch_pack<scalar_t>(vec, [&](auto v) {
              gn_bwd_apply_kernel<scalar_t, acc_t, decltype(a)::value, decltype(v)::value>
                  <<<ctas, kThreads, 0, stream>>>(
                      gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                      b.const_data_ptr<acc_t>(), pc.const_data_ptr<bool>(), mc.const_data_ptr<acc_t>(),
                      rc.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), M, C,
                      num_groups, L);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
          });
        }
      }
    });
  } else if (dx.defined()) {
    dx.zero_();
  }
  at::Tensor dw = output_mask[1] ? dgamma.sum(0).to(weight.scalar_type()) : at::Tensor();
  at::Tensor db = output_mask[2] ? dbeta.sum(0).to(bias.scalar_type()) : at::Tensor();
  return {dx, dw, db};
}

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) {
  m.impl("modality_group_norm_fwd", &gmd_ext::modality_group_norm_fwd_cuda);
  m.impl("modality_group_norm_bwd", &gmd_ext::modality_group_norm_bwd_cuda);
}
