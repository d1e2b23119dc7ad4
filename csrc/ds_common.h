// Pieces shared by the Dynamic Sharing kernels (masked_conv, modality_group_norm) on every device: the fused
// activation, the row-index check of pack/scatter and the group-norm argument checks. Host/device inline so the
// CPU (.cpp) and CUDA (.cu) kernels compile the same definitions.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
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

inline void check_scatter_args(const at::Tensor& y, const at::Tensor& index, int64_t num_pairs) {
  TORCH_CHECK_VALUE(y.dim() >= 1, "scatter_pairs: y must be [P, *F] with a leading row dim, got a 0-D tensor");
  check_index("scatter_pairs", index, y, "y");
  TORCH_CHECK_VALUE(index.numel() == y.size(0), "scatter_pairs: index has ", index.numel(),
                    " entries but y has ", y.size(0), " rows; they must match");
  TORCH_CHECK_VALUE(num_pairs >= 0, "scatter_pairs: num_pairs must be >= 0, got ", num_pairs);
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

// Power-of-two scale that brings values of mean magnitude `mean_abs` near 1: the centred squares of the variance
// pass are formed as ((x - c) * scale)^2, which cannot overflow fp32 for any finite x below ~1e37 (unscaled, they
// do from |x - c| ~ 1.8e19 on), and the variance is (sum / count) / scale^2 in fp64. Exact: scaling by a power of two
// rounds nothing. Every backend uses it (docs/design.md: statistics equal across backends).
C10_HOST_DEVICE inline double group_norm_scale(double mean_abs) {
  if (!(mean_abs > 0) || !(mean_abs < 1e300)) return 1.0;  // zero, NaN or inf: nothing to scale
  return ::ldexp(1.0, -::ilogb(mean_abs));
}

}  // namespace gmd_ext
