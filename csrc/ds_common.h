// Pieces shared by the Dynamic Sharing kernels (masked_conv, modality_group_norm) on every device: the fused
// activation, the row-index check of pack/scatter and the group-norm argument checks. Host/device inline so the
// CPU (.cpp) and CUDA (.cu) kernels compile the same definitions.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <unistd.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace gmd_ext {

enum class Activation { kNone, kRelu, kLeakyRelu };

// nn.LeakyReLU's default slope; gmd_ext/ops/reference.py LEAKY_SLOPE and the Triton kernel use the same value.
constexpr double kLeakySlope = 0.01;

inline Activation parse_activation(c10::string_view activation) {
  if (activation == "none") return Activation::kNone;
  if (activation == "relu") return Activation::kRelu;
  if (activation == "leaky_relu") return Activation::kLeakyRelu;
  TORCH_CHECK_VALUE(false, "modality_group_norm: activation must be \"none\", \"relu\" or \"leaky_relu\", got \"",
                    std::string(activation), "\"");
}

template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t activate(acc_t z) {
  if constexpr (A == Activation::kRelu) return z > 0 ? z : acc_t(0);
  if constexpr (A == Activation::kLeakyRelu) return z > 0 ? z : z * acc_t(kLeakySlope);
  return z;
}

// d activation / dz (torch's convention at z == 0: relu 0, leaky_relu the slope).
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t activate_grad(acc_t z) {
  if constexpr (A == Activation::kRelu) return z > 0 ? acc_t(1) : acc_t(0);
  if constexpr (A == Activation::kLeakyRelu) return z > 0 ? acc_t(1) : acc_t(kLeakySlope);
  return acc_t(1);
}

// Calls f with the activation as a compile-time constant.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kNone: f(std::integral_constant<Activation, Activation::kNone>{}); break;
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>{}); break;
    case Activation::kLeakyRelu: f(std::integral_constant<Activation, Activation::kLeakyRelu>{}); break;
  }
}

// pack_pairs / scatter_pairs / masked_conv: index is a 1-D int64 tensor on t's device. Its values are checked on
// the host only (csrc/cpu/masked_conv_cpu.cpp, and where the plan is built: gmd_ext.ops.ds_ops.PairPlan); on a
// GPU that check would be a host synchronisation, so the CUDA kernels instead guard every access (docs/design.md).
inline void check_index(const char* op, const at::Tensor& index, const at::Tensor& t, const char* tname) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be an int64 tensor, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, op, ": index must be 1-D [P], got ", index.dim(), "-D ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == t.device(), op, ": index must be on ", tname, "'s device ", t.device(),
                    ", got ", index.device());
}

// The byte size of one row [*F] of t [N, *F], also when N == 0 (then nbytes() / N is undefined).
inline int64_t row_bytes(const at::Tensor& t) {
  int64_t n = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

inline void check_pack_args(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "pack_pairs: x must be [N, *F] with a leading row dim, got a 0-D tensor");
  check_index("pack_pairs", index, x, "x");
}

// Refuses an output of `rows` rows of `bytes_per_row` bytes that can never be allocated (more bytes than this
// machine's physical memory, which bounds a GPU's too), naming the argument that makes it that large, before the
// allocator fails with a message that names none (gmd_ext/ops/ds_ops.py _check_output_bytes is the Python twin).
inline void check_output_fits(const char* op, const char* cause, int64_t rows, int64_t bytes_per_row) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const double limit = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page)
                                             : static_cast<double>(std::numeric_limits<int64_t>::max());
  const double bytes = static_cast<double>(rows) * static_cast<double>(bytes_per_row);
  TORCH_CHECK_VALUE(bytes <= limit, op, ": the output would take ", bytes, " bytes, more than this machine's ",
                    "physical memory (", limit, " bytes); ", cause);
}

inline void check_scatter_args(const at::Tensor& y, const at::Tensor& index, int64_t num_pairs) {
  TORCH_CHECK_VALUE(y.dim() >= 1, "scatter_pairs: y must be [P, *F] with a leading row dim, got a 0-D tensor");
  check_index("scatter_pairs", index, y, "y");
  TORCH_CHECK_VALUE(index.numel() == y.size(0), "scatter_pairs: index has ", index.numel(),
                    " entries but y has ", y.size(0), " rows; they must match");
  TORCH_CHECK_VALUE(num_pairs >= 0, "scatter_pairs: num_pairs must be >= 0, got ", num_pairs);
  check_output_fits("scatter_pairs", ("num_pairs = " + std::to_string(num_pairs) + " rows").c_str(), num_pairs,
                    row_bytes(y));
}

// modality_group_norm's argument checks, the same for every device; returns the element count L of one channel.
inline int64_t check_group_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& present, int64_t num_groups) {
  TORCH_CHECK_VALUE(x.dim() >= 4 && x.dim() <= 6,
                    "modality_group_norm: x must be [B, M, C, *S] with 1-3 spatial dims, got ", x.sizes());
  const int64_t B = x.size(0), M = x.size(1), C = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == M && weight.size(1) == C,
                    "modality_group_norm: weight must be [M, C] = [", M, ", ", C, "], got ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 2 && bias.size(0) == M && bias.size(1) == C,
                    "modality_group_norm: bias must be [M, C] = [", M, ", ", C, "], got ", bias.sizes());
  TORCH_CHECK_VALUE(present.scalar_type() == at::kBool && present.dim() == 2 && present.size(0) == B &&
                        present.size(1) == M,
                    "modality_group_norm: present must be bool [B, M] = [", B, ", ", M, "], got ",
                    present.scalar_type(), " ", present.sizes());
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "modality_group_norm: num_groups (", num_groups,
                    ") must be positive and divide C = ", C);
  for (const auto* t : {&weight, &bias, &present}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "modality_group_norm: all tensors must be on x's device ",
                      x.device(), ", got one on ", t->device());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "modality_group_norm: x must be float64, float32, float16 "
                   "or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(bias.scalar_type()),
                   "modality_group_norm: weight and bias must be floating point, got ", weight.scalar_type(), " and ",
                   bias.scalar_type());
  const int64_t rows = B * M * C;
  return rows ? x.numel() / rows : 0;
}

// modality_group_norm_fwd's eps: finite and non-negative (a negative eps can make var + eps negative: NaN rstd).
inline void check_group_norm_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "modality_group_norm_fwd: eps must be a finite number >= 0, got ",
                    eps);
}

// modality_group_norm_bwd's extra arguments, after check_group_norm_args: grad_y has x's shape and a floating
// dtype on x's device; mean and rstd are exactly [B, M, num_groups] of the forward's statistics dtype (fp64 for
// fp64 x, else fp32) on x's device. The kernels index mean/rstd by B * M * G: any other size reads or writes out
// of bounds.
inline void check_group_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& rstd, int64_t num_groups) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "modality_group_norm_bwd: grad_y must have x's shape ", x.sizes(),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_y.scalar_type()), "modality_group_norm_bwd: grad_y must be floating "
                   "point, got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), "modality_group_norm_bwd: grad_y must be on x's device ",
                    x.device(), ", got ", grad_y.device());
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> want{x.size(0), x.size(1), num_groups};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    TORCH_CHECK_VALUE(t.sizes() == want, "modality_group_norm_bwd: ", name, " must be [B, M, num_groups] = ",
                      c10::IntArrayRef(want), " (the forward's statistics), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == stat, "modality_group_norm_bwd: ", name, " must be ", stat,
                     " (the forward's statistics dtype for ", x.scalar_type(), " x), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "modality_group_norm_bwd: ", name, " must be on x's device ",
                      x.device(), ", got ", t.device());
  }
}

// ---------------------------------------------------------------- group-norm statistics at any magnitude
// Every backend (CPU, CUDA, Triton: gmd_ext/triton/modality_group_norm.py, torch: gmd_ext/ops/reference.py) computes
// a group's statistics from chunks of consecutive elements. A chunk's values v are used as s = v * 2^-e, with e the
// frexp exponent of the chunk's max |v| (so |s| < 1): then no sum, square or product of the statistics overflows or
// underflows, whatever the magnitude from the dtype's smallest subnormal to its max (unscaled, fp32 squares overflow
// from |x - mean| ~ 1.8e19 on and fp32 sums of values near 3e38 overflow; the scale 2^-e alone overflows fp32 for a
// subnormal chunk, so it is applied as two factors). Scaling by a power of two rounds nothing (a product that falls
// below the smallest normal loses only bits that are negligible next to the chunk's max).

// The exponent of a chunk of zeros: below every real one, so a merge never rescales other chunks towards it.
constexpr int kGnZeroExponent = -8192;

// A chunk's (or merged chunks') moments: count, exponent e, and the mean and M2 (sum of squared deviations from the
// mean) of the scaled values: the values' own mean is mean * 2^e and their M2 is m2 * 4^e. fp64 throughout.
struct GnMoments {
  double count, exponent, mean, m2;
};

// e for a chunk whose max |v| is max_abs (max_abs = f * 2^e, f in [0.5, 1)); 0 (no scaling) for inf or NaN, which
// then propagate to the statistics as in F.group_norm.
template <typename acc_t>
C10_HOST_DEVICE inline int gn_exponent(acc_t max_abs) {
  if (max_abs == acc_t(0)) return kGnZeroExponent;
  if (!(static_cast<double>(max_abs) <= 1.7976931348623157e308)) return 0;
  int e = 0;
  ::frexp(static_cast<double>(max_abs), &e);  // float -> double is exact
  return e;
}

// s = v * 2^-e as two exact multiplications by powers of two that are normal numbers of acc_t (|k| <= 75 for fp32,
// <= 537 for fp64): 2^-e itself ranges over 2^-128 .. 2^148 for fp32 chunks.
template <typename acc_t>
struct GnScale {
  acc_t lo, hi;
  C10_HOST_DEVICE acc_t operator()(acc_t v) const { return v * lo * hi; }
};
template <typename acc_t>
C10_HOST_DEVICE inline GnScale<acc_t> gn_scale(int e) {
  if (e == kGnZeroExponent) return {acc_t(1), acc_t(1)};
  const int k = -e, k1 = k / 2;
  return {static_cast<acc_t>(::ldexp(1.0, k1)), static_cast<acc_t>(::ldexp(1.0, k - k1))};
}

// A chunk's moments from its scaled sums about a centre c near the scaled mean (the rounded scaled mean: a
// centred second pass, no cancellation): sd = sum(s - c), sd2 = sum((s - c)^2) over `count` elements.
C10_HOST_DEVICE inline GnMoments gn_chunk_moments(double count, int e, double c, double sd, double sd2) {
  return {count, static_cast<double>(e), c + sd / count, ::fmax(0.0, sd2 - sd * sd / count)};
}

// Chan's parallel formula on moments brought to the larger exponent (exact rescaling by powers of two). Not
// associative in rounding: every backend merges in a fixed order, so results are deterministic.
C10_HOST_DEVICE inline GnMoments gn_merge(const GnMoments& a, const GnMoments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const double e = ::fmax(a.exponent, b.exponent);
  const int da = static_cast<int>(a.exponent - e), db = static_cast<int>(b.exponent - e);
  const double ma = ::ldexp(a.mean, da), mb = ::ldexp(b.mean, db);
  const double n = a.count + b.count, delta = mb - ma;
  return {n, e, ma + delta * (b.count / n),
          ::ldexp(a.m2, 2 * da) + ::ldexp(b.m2, 2 * db) + delta * delta * (a.count * b.count / n)};
}

// The group's mean and rstd = 1 / sqrt(var + eps) in fp64 from its merged moments, without leaving the scaled
// domain before the end: rstd = 2^-e / sqrt(var_s + eps * 4^-e). eps * 4^-e is inf only when eps dwarfs the
// variance (a tiny group): rstd = 1 / sqrt(eps) then. Zeros for an empty group (absent pairs).
struct GnStats {
  double mean, rstd;
};
C10_HOST_DEVICE inline GnStats gn_finalize(const GnMoments& s, double eps) {
  if (s.count == 0) return {0.0, 0.0};
  const int e = static_cast<int>(s.exponent);
  const double q = s.m2 / s.count + ::ldexp(eps, -2 * e);
  double rstd = q;  // NaN statistics propagate
  if (q <= 1.7976931348623157e308) {
    rstd = ::ldexp(1.0 / ::sqrt(q), -e);
  } else if (q > 0) {
    rstd = 1.0 / ::sqrt(eps);
  }
  return {::ldexp(s.mean, e), rstd};
}

// xhat = (x - mean) * rstd for the backward passes, without overflow: x - mean overflows where |x| + |mean| passes
// the dtype's max (fp32 values near 3e38 of both signs). Both are halved first unless the mean is tiny: halving a
// normal number is exact, so the result is bit-identical to (x - mean) * rstd wherever that does not overflow; with
// a tiny mean (a subnormal group) nothing is halved, since halving a subnormal x would round it.
template <typename acc_t>
struct GnNormalizer {
  acc_t half, half_mean, twice_rstd;
  C10_HOST_DEVICE acc_t operator()(acc_t x) const { return (x * half - half_mean) * twice_rstd; }
};
template <typename acc_t>
C10_HOST_DEVICE inline GnNormalizer<acc_t> gn_normalizer(acc_t mean, acc_t rstd) {
  const bool tiny = (mean < 0 ? -mean : mean) < acc_t(7.888609052210118e-31);  // 2^-100
  const acc_t h = tiny ? acc_t(1) : acc_t(0.5);
  return {h, mean * h, rstd * (tiny ? acc_t(1) : acc_t(2))};  // a multiply: a division is a call on the GPU
}

}  // namespace gmd_ext
