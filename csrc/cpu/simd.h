// Portable SIMD for the CPU kernels of the GMD projection ops (gram, combine, combine_rows).
//
// The extension is built with one set of flags (-O3, no -march), so at::vec::Vectorized would compile to its
// generic scalar-array fallback here, and a per-block MKL call is ~15x off the memory floor for the K x 8M
// Gramian (MKL sgemm at m = n = 15 managed 4.5 GFMA/s per core on the 2-core dev box). Instead the kernels are
// written once with GCC/Clang vector extensions, inlined into one entry point per ISA that carries a
// `target` attribute (AVX-512, AVX2+FMA, baseline), and picked at run time. The choice follows
// at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects the path (tests use it).
// Only our own internal-linkage functions get target attributes, so no inline function shared with other
// translation units is ever compiled for a wider ISA than the baseline.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../projection_checks.h"
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call boundary

#define GMD_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GMD_X86 1
#define GMD_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))
#define GMD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace gmd_ext::cpu {

enum class Isa { Baseline, Avx2, Avx512 };

inline Isa cpu_isa() {
#ifdef GMD_X86
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::Avx512;
    if (cap == "AVX2") return Isa::Avx2;
    return Isa::Baseline;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

template <int W>
struct VecOf {
  typedef float f __attribute__((vector_size(W * 4)));
  typedef uint32_t u32 __attribute__((vector_size(W * 4)));
  typedef int32_t i32 __attribute__((vector_size(W * 4)));
  typedef uint16_t u16 __attribute__((vector_size(W * 2)));
};
template <int W>
using vfloat = typename VecOf<W>::f;

template <int W>
GMD_INLINE vfloat<W> splat(float x) {
  return vfloat<W>{} + x;
}

template <int W>
GMD_INLINE float hsum(vfloat<W> v) {
  float s = 0.f;
#pragma GCC unroll 16
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// W consecutive elements of p as floats. Half/BFloat16 are widened with integer bit operations (the
// branch-free algorithm of c10::detail::fp16_ieee_to_fp32_value), which vectorise on every ISA.
template <int W>
GMD_INLINE vfloat<W> load_float(const float* p) {
  vfloat<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
GMD_INLINE vfloat<W> load_float(const c10::BFloat16* p) {
  using V = VecOf<W>;
  typename V::u16 h;
  std::memcpy(&h, p, sizeof(h));
  auto w = __builtin_convertvector(h, typename V::u32) << 16;
  vfloat<W> out;
  std::memcpy(&out, &w, sizeof(out));
  return out;
}

template <int W>
GMD_INLINE vfloat<W> load_float(const c10::Half* p) {
  using V = VecOf<W>;
  typename V::u16 h;
  std::memcpy(&h, p, sizeof(h));
  const typename V::u32 w = __builtin_convertvector(h, typename V::u32) << 16;
  const typename V::u32 sign = w & 0x80000000u;
  const typename V::u32 two_w = w + w;
  // Normal numbers (and Inf/NaN): move the exponent/mantissa into place, then rescale the exponent bias.
  const typename V::u32 norm_bits = (two_w >> 4) + (0xE0u << 23);
  vfloat<W> normalized;
  std::memcpy(&normalized, &norm_bits, sizeof(normalized));
  normalized *= 0x1.0p-112f;
  // Subnormals: build 0.5 + m * 2^-24 via the magic bias, then subtract 0.5.
  const typename V::u32 denorm_bits = (two_w >> 17) | (126u << 23);
  vfloat<W> denormalized;
  std::memcpy(&denormalized, &denorm_bits, sizeof(denormalized));
  denormalized -= 0.5f;
  typename V::u32 nb, db;
  std::memcpy(&nb, &normalized, sizeof(nb));
  std::memcpy(&db, &denormalized, sizeof(db));
  const typename V::u32 is_denorm = (typename V::u32)(two_w < (1u << 27));
  const typename V::u32 bits = sign | ((is_denorm & db) | (~is_denorm & nb));
  vfloat<W> out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <int W>
GMD_INLINE void store_float(float* p, vfloat<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Copy columns [n0, n0 + nb) of the [K, N] matrix at `base` (element strides s0, s1) into the row-major fp32
// block dst [K, ld]. This is the one slow-path for non-unit column stride and the widening of Half/BFloat16.
template <int W, typename T>
GMD_INLINE void load_block(const T* base, int64_t s0, int64_t s1, int64_t K, int64_t n0, int64_t nb, float* dst,
                           int64_t ld) {
  if (s1 == 1) {
    for (int64_t k = 0; k < K; ++k) {
      const T* src = base + k * s0 + n0;
      float* out = dst + k * ld;
      int64_t n = 0;
      for (; n + W <= nb; n += W) store_float<W>(out + n, load_float<W>(src + n));
      for (; n < nb; ++n) out[n] = static_cast<float>(src[n]);
    }
  } else if (s0 == 1) {
    // Transposed storage: walk the source in memory order (columns are contiguous), scatter into rows.
    for (int64_t n = 0; n < nb; ++n) {
      const T* src = base + (n0 + n) * s1;
      for (int64_t k = 0; k < K; ++k) dst[k * ld + n] = static_cast<float>(src[k]);
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < nb; ++n) dst[k * ld + n] = static_cast<float>(base[k * s0 + (n0 + n) * s1]);
  }
}

template <typename T>
using LoadBlockFn = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

#ifdef GMD_X86
template <typename T>
GMD_TARGET_AVX512 void load_block_avx512(const T* base, int64_t s0, int64_t s1, int64_t K, int64_t n0, int64_t nb,
                                         float* dst, int64_t ld) {
  load_block<16>(base, s0, s1, K, n0, nb, dst, ld);
}
template <typename T>
GMD_TARGET_AVX2 void load_block_avx2(const T* base, int64_t s0, int64_t s1, int64_t K, int64_t n0, int64_t nb,
                                     float* dst, int64_t ld) {
  load_block<8>(base, s0, s1, K, n0, nb, dst, ld);
}
#endif
template <typename T>
void load_block_baseline(const T* base, int64_t s0, int64_t s1, int64_t K, int64_t n0, int64_t nb, float* dst,
                         int64_t ld) {
  load_block<4>(base, s0, s1, K, n0, nb, dst, ld);
}

// load_block compiled for the widest ISA this CPU runs.
template <typename T>
LoadBlockFn<T> pick_load_block(Isa isa) {
#ifdef GMD_X86
  if (isa == Isa::Avx512) return load_block_avx512<T>;
  if (isa == Isa::Avx2) return load_block_avx2<T>;
#endif
  return load_block_baseline<T>;
}

}  // namespace gmd_ext::cpu
