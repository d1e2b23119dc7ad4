// combine(G [K, N], c [K], shared [N] | None, shared_scale, other_scale) -> [N] and
// combine_rows(G [K, N], A [R, K]) -> A @ G [R, N], CPU: pass 2 of the GMD projection (docs/design.md).
//
// Both are linear combinations of the rows of G, computed per block of columns: a block of R_T output rows
// keeps R_T x U vector accumulators in registers and streams the K input rows once. Math in fp32; the result
// is rounded once to G's dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "simd.h"

namespace gmd_ext::cpu {
namespace {

// Per-element scale of combine: shared_scale where shared[n] (or everywhere when shared is null), else
// other_scale. Fused into the store so the [N] result is written once (a separate pass over it cost 0.45x
// of the whole op at K = 15, N = 8M on the 2-core dev box).
struct Scale {
  const bool* shared = nullptr;  // offset to the block's first column
  float shared_scale = 1.f, other_scale = 1.f;
};

template <int W>
GMD_INLINE vfloat<W> scale_vec(const Scale& sc, int64_t n) {
  if (sc.shared == nullptr) return splat<W>(sc.shared_scale);
  typedef uint8_t u8 __attribute__((vector_size(W)));
  u8 m;
  std::memcpy(&m, sc.shared + n, sizeof(m));  // torch bools are bytes holding 0 or 1
  const vfloat<W> f = __builtin_convertvector(m, vfloat<W>);
  return splat<W>(sc.other_scale) + f * (sc.shared_scale - sc.other_scale);
}

// out_r[n] = scale(n) * sum_k coef[r * K + k] * rows[k][n] for r < RT, n < B (fp32), scale(n) = 1 unless
// SCALED. U vectors per step give the out-of-order core independent FMA chains; RT > 1 reuses each loaded
// input vector for RT outputs.
template <int W, int RT, int U, bool SCALED, typename T>
GMD_INLINE void lincomb_tile(const T* const* rows, const float* coef, int64_t K, int64_t B, float* const* out,
                             const Scale& sc) {
  using V = vfloat<W>;
  int64_t n = 0;
  for (; n + U * W <= B; n += U * W) {
    V acc[RT][U];
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[r][u] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V x[U];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) x[u] = load_float<W>(rows[k] + n + u * W);
#pragma GCC unroll 8
      for (int r = 0; r < RT; ++r) {
        const V cr = splat<W>(coef[r * K + k]);
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) acc[r][u] += cr * x[u];
      }
    }
    if constexpr (SCALED) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const V s = scale_vec<W>(sc, n + u * W);
#pragma GCC unroll 8
        for (int r = 0; r < RT; ++r) acc[r][u] *= s;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) store_float<W>(out[r] + n + u * W, acc[r][u]);
  }
  for (; n < B; ++n)
    for (int r = 0; r < RT; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += coef[r * K + k] * static_cast<float>(rows[k][n]);
      if constexpr (SCALED) s *= (sc.shared == nullptr || sc.shared[n]) ? sc.shared_scale : sc.other_scale;
      out[r][n] = s;
    }
}

template <int W, int RT, int U, typename T>
GMD_INLINE void lincomb_rows(int rt, const T* const* rows, const float* coef, int64_t K, int64_t B,
                             float* const* out) {
  if constexpr (RT > 1) {
    if (rt < RT) return lincomb_rows<W, RT - 1, U>(rt, rows, coef, K, B, out);
  }
  lincomb_tile<W, RT, U, false>(rows, coef, K, B, out, Scale{});
}

// All R output rows of one block: tiles of up to 4 output rows (4 x 2 accumulators + 2 inputs fit 16 regs).
// `sc` non-null: combine (R == 1, scaled).
template <int W, typename T>
GMD_INLINE void lincomb_block(const T* const* rows, const float* coef, int64_t R, int64_t K, int64_t B,
                              float* const* out, const Scale* sc) {
  if (sc != nullptr) return lincomb_tile<W, 1, 4, true>(rows, coef, K, B, out, *sc);
  if (R == 1) return lincomb_tile<W, 1, 4, false>(rows, coef, K, B, out, Scale{});
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int rt = static_cast<int>(std::min<int64_t>(4, R - r0));
    lincomb_rows<W, 4, 2>(rt, rows, coef + r0 * K, K, B, out + r0);
  }
}

template <typename T>
using LincombFn = void (*)(const T* const*, const float*, int64_t, int64_t, int64_t, float* const*, const Scale*);

#ifdef GMD_X86
template <typename T>
GMD_TARGET_AVX512 void lincomb_avx512(const T* const* rows, const float* coef, int64_t R, int64_t K, int64_t B,
                                      float* const* out, const Scale* sc) {
  lincomb_block<16>(rows, coef, R, K, B, out, sc);
}
template <typename T>
GMD_TARGET_AVX2 void lincomb_avx2(const T* const* rows, const float* coef, int64_t R, int64_t K, int64_t B,
                                  float* const* out, const Scale* sc) {
  lincomb_block<8>(rows, coef, R, K, B, out, sc);
}
#endif
template <typename T>
void lincomb_baseline(const T* const* rows, const float* coef, int64_t R, int64_t K, int64_t B, float* const* out,
                      const Scale* sc) {
  lincomb_block<4>(rows, coef, R, K, B, out, sc);
}
// combine on Half/BFloat16 rows, widened on load (the scratch path costs 2.2x here: 54 vs 24 ms at K = 15,
// N = 8M bf16 on the 2-core dev box). Only this one kernel shape is compiled per low-precision dtype.
template <typename T>
using CombineLowpFn = void (*)(const T* const*, const float*, int64_t, int64_t, float*, const Scale&);
#ifdef GMD_X86
template <typename T>
GMD_TARGET_AVX512 void combine_lowp_avx512(const T* const* rows, const float* c, int64_t K, int64_t B, float* out,
                                           const Scale& sc) {
  lincomb_tile<16, 1, 4, true>(rows, c, K, B, &out, sc);
}
template <typename T>
GMD_TARGET_AVX2 void combine_lowp_avx2(const T* const* rows, const float* c, int64_t K, int64_t B, float* out,
                                       const Scale& sc) {
  lincomb_tile<8, 1, 4, true>(rows, c, K, B, &out, sc);
}
#endif
template <typename T>
void combine_lowp_baseline(const T* const* rows, const float* c, int64_t K, int64_t B, float* out,
                           const Scale& sc) {
  lincomb_tile<4, 1, 4, true>(rows, c, K, B, &out, sc);
}

template <typename T>
CombineLowpFn<T> pick_combine_lowp(Isa isa) {
#ifdef GMD_X86
  if (isa == Isa::Avx512) return combine_lowp_avx512<T>;
  if (isa == Isa::Avx2) return combine_lowp_avx2<T>;
#endif
  return combine_lowp_baseline<T>;
}

template <typename T>
LincombFn<T> pick_lincomb(Isa isa) {
#ifdef GMD_X86
  if (isa == Isa::Avx512) return lincomb_avx512<T>;
  if (isa == Isa::Avx2) return lincomb_avx2<T>;
#endif
  return lincomb_baseline<T>;
}

// out [R, N] (contiguous, G's dtype) = coef [R, K] @ G; with `scale` (combine, R == 1) out[n] *= scale(n),
// scale(n) = shared[n] ? shared_scale : other_scale (shared null: shared_scale everywhere).
template <typename T>
void lincomb_kernel(const at::Tensor& G, const float* coef, int64_t R, T* out, const bool* shared, bool scale,
                    float shared_scale, float other_scale) {
  const int64_t K = G.size(0), N = G.size(1);
  const int64_t s0 = G.stride(0), s1 = G.stride(1);
  const T* base = G.const_data_ptr<T>();
  // 2048 columns: the K input rows of a block (<= 256 KiB for K <= 32 in fp32) stay in L2 for the R / 4
  // re-reads of combine_rows, and the R output rows stay in L1/L2 until they are rounded and stored.
  constexpr int64_t B = 2048;
  // Unit column stride is read in place (fp32, and Half/BFloat16 for combine); other strides, and
  // Half/BFloat16 for combine_rows, are first copied (widened) into an fp32 scratch block, which keeps the
  // number of compiled kernel shapes (and the build time) down.
  constexpr bool to_float = std::is_same_v<T, float>;
  const bool direct = s1 == 1 && (to_float || scale);
  const Isa isa = cpu_isa();
  const LincombFn<float> lin_f32 = pick_lincomb<float>(isa);
  CombineLowpFn<T> comb_lowp = nullptr;
  if constexpr (!to_float) comb_lowp = pick_combine_lowp<T>(isa);
  const LoadBlockFn<T> load_fn = pick_load_block<T>(isa);

  at::parallel_for(0, (N + B - 1) / B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> scratch(direct ? 0 : K * B);
    std::vector<float> tmp(to_float ? 0 : R * B);
    std::vector<const float*> frows(K);
    std::vector<const T*> rows(K);
    std::vector<float*> outs(R);
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t n0 = blk * B, nb = std::min(B, N - n0);
      for (int64_t r = 0; r < R; ++r)
        outs[r] = to_float ? reinterpret_cast<float*>(out) + r * N + n0 : tmp.data() + r * B;
      Scale sc{shared == nullptr ? nullptr : shared + n0, shared_scale, other_scale};
      const Scale* scp = scale ? &sc : nullptr;
      if (direct && !to_float) {
        for (int64_t k = 0; k < K; ++k) rows[k] = base + k * s0 + n0;
        comb_lowp(rows.data(), coef, K, nb, outs[0], sc);
      } else {
        if (direct) {
          for (int64_t k = 0; k < K; ++k) frows[k] = reinterpret_cast<const float*>(base) + k * s0 + n0;
        } else {
          load_fn(base, s0, s1, K, n0, nb, scratch.data(), B);
          for (int64_t k = 0; k < K; ++k) frows[k] = scratch.data() + k * B;
        }
        lin_f32(frows.data(), coef, R, K, nb, outs.data(), scp);
      }
      if constexpr (!std::is_same_v<T, float>) {
        for (int64_t r = 0; r < R; ++r) {
          T* dst = out + r * N + n0;
          for (int64_t n = 0; n < nb; ++n) dst[n] = static_cast<T>(outs[r][n]);
        }
      }
    }
  });
}

// A fresh multi-MB output is mapped by the kernel on first touch, one 4 KiB page fault at a time: for an
// 8M-float combine output that cost 15 ms against 8 ms for the writes themselves (2-core EPYC dev box). Asking
// for transparent huge pages on the untouched buffer (THP in "madvise" mode there) removes that cost; the
// advice is only a hint, so a kernel without THP simply ignores it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t nbytes = out.nbytes();
  if (nbytes >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + nbytes) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace

at::Tensor combine_cpu(const at::Tensor& G, const at::Tensor& c, const std::optional<at::Tensor>& shared,
                       double shared_scale, double other_scale) {
  constexpr const char* op = "gmd_ext::combine";
  check_G(op, G, c10::DeviceType::CPU, "CPU");
  const int64_t N = G.size(1);
  check_combine_args(op, G, c, shared);
  at::Tensor shared_c;
  if (shared.has_value()) shared_c = shared->contiguous();
  at::Tensor out = empty_output({N}, G.options());
  if (N == 0) return out;
  const at::Tensor coef = c.contiguous();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    lincomb_kernel<T>(G, coef.const_data_ptr<float>(), 1, out.data_ptr<T>(),
                      shared_c.defined() ? shared_c.const_data_ptr<bool>() : nullptr, true,
                      static_cast<float>(shared_scale), static_cast<float>(other_scale));
  });
  return out;
}

at::Tensor combine_rows_cpu(const at::Tensor& G, const at::Tensor& A) {
  constexpr const char* op = "gmd_ext::combine_rows";
  check_G(op, G, c10::DeviceType::CPU, "CPU");
  const int64_t N = G.size(1);
  check_combine_rows_args(op, G, A);
  const int64_t R = A.size(0);
  at::Tensor out = empty_output({R, N}, G.options());
  if (R == 0 || N == 0) return out;
  const at::Tensor coef = A.contiguous();
  dispatch_dtype(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    lincomb_kernel<T>(G, coef.const_data_ptr<float>(), R, out.data_ptr<T>(), nullptr, false, 1.f, 1.f);
  });
  return out;
}

}  // namespace gmd_ext::cpu

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) {
  m.impl("combine", &gmd_ext::cpu::combine_cpu);
  m.impl("combine_rows", &gmd_ext::cpu::combine_rows_cpu);
}
