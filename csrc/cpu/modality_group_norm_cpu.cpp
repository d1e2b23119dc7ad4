// modality_group_norm (Dynamic Sharing, docs/design.md): GroupNorm statistics per (b, m) pair, affine parameters per
// modality [M, C], optional fused ReLU / LeakyReLU(0.01); absent pairs are skipped (zeros out, no gradient).
//
// x [B, M, C, L] contiguous (L = prod(*S)) puts group g of pair (b, m) at the contiguous range
// [t * n, (t + 1) * n) with t = (b * M + m) * G + g and n = C / G * L, so one task per t needs no index math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ds_common.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace gmd_ext {

namespace {

// Tasks below ~32 K elements are batched per thread: smaller hand-offs cost more than they save.
constexpr int64_t kGrainElems = 32768;
constexpr int64_t kLanes = 8;       // independent accumulators: lets the compiler vectorise the reductions
constexpr int64_t kBlock = 1024;    // lane sums are folded into a double every kBlock elements (bounds fp32 error)

// (sum of f(p[i]), sum of g(p[i])) over p[0, n), with fp32 (acc_t) lanes inside each block and doubles across
// blocks.
template <typename acc_t, typename scalar_t, typename F, typename Gf>
std::pair<double, double> blocked_sums(const scalar_t* p, int64_t n, F f, Gf g) {
  double total_f = 0, total_g = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    acc_t lf[kLanes] = {}, lg[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const acc_t v = static_cast<acc_t>(p[i + k]);
        lf[k] += f(v);
        lg[k] += g(v);
      }
    }
    for (; i < end; ++i) {
      const acc_t v = static_cast<acc_t>(p[i]);
      lf[0] += f(v);
      lg[0] += g(v);
    }
    acc_t sf = 0, sg = 0;
    for (int64_t k = 0; k < kLanes; ++k) {
      sf += lf[k];
      sg += lg[k];
    }
    total_f += sf;
    total_g += sg;
  }
  return {total_f, total_g};
}

template <typename scalar_t, Activation A>
void group_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& present,
                           int64_t G, int64_t L, double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(1), C = x.size(2), Cg = C / G, n = Cg * L;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  const acc_t* W = w.const_data_ptr<acc_t>();
  const acc_t* Bi = b.const_data_ptr<acc_t>();
  const bool* P = present.const_data_ptr<bool>();
  scalar_t* Y = y.mutable_data_ptr<scalar_t>();
  acc_t* MEAN = mean.mutable_data_ptr<acc_t>();
  acc_t* RSTD = rstd.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1));
  at::parallel_for(0, mean.numel(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / G, g = t % G, m = pair % M;
      const scalar_t* xg = X + t * n;
      scalar_t* yg = Y + t * n;
      if (!P[pair]) {
        std::fill(yg, yg + n, scalar_t(0));
        MEAN[t] = RSTD[t] = 0;
        continue;
      }
      // Two passes (mean, then centred variance) rather than sum / sum of squares: no cancellation. The
      // centred values are scaled by a power of two (group_norm_scale, csrc/ds_common.h) so their squares do
      // not overflow fp32 for large finite inputs; pass 2 also refines the mean around the fp32 centre c.
      const auto [sum, sum_abs] = blocked_sums<acc_t>(xg, n, [](acc_t v) { return v; },
                                                      [](acc_t v) { return v < 0 ? -v : v; });
      const acc_t c = static_cast<acc_t>(sum / n);
      const double scale = group_norm_scale(sum_abs / n);
      const acc_t sc = static_cast<acc_t>(scale);
      const auto [sd, sd2] = blocked_sums<acc_t>(xg, n, [c, sc](acc_t v) { return (v - c) * sc; },
                                                 [c, sc](acc_t v) { return ((v - c) * sc) * ((v - c) * sc); });
      const double var = std::max(0.0, (sd2 - sd * sd / n) / n) / (scale * scale);
      const acc_t mu = static_cast<acc_t>(static_cast<double>(c) + sd / n / scale);
      const acc_t rs = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      MEAN[t] = mu;
      RSTD[t] = rs;
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = m * C + g * Cg + c;
        const acc_t a = rs * W[ch], s = Bi[ch] - mu * a;  // z = x * a + s = (x - mu) * rs * w + b
        const scalar_t* xc = xg + c * L;
        scalar_t* yc = yg + c * L;
        for (int64_t l = 0; l < L; ++l) yc[l] = static_cast<scalar_t>(activate<A>(static_cast<acc_t>(xc[l]) * a + s));
      }
    }
  });
}

template <typename scalar_t, Activation A>
void group_norm_bwd_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                           const at::Tensor& present, const at::Tensor& mean, const at::Tensor& rstd, int64_t G,
                           int64_t L, at::Tensor& dx, at::Tensor& dgamma, at::Tensor& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(1), C = x.size(2), Cg = C / G, n = Cg * L;
  const scalar_t* GY = gy.const_data_ptr<scalar_t>();
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  const acc_t* W = w.const_data_ptr<acc_t>();
  const acc_t* Bi = b.const_data_ptr<acc_t>();
  const bool* P = present.const_data_ptr<bool>();
  const acc_t* MEAN = mean.const_data_ptr<acc_t>();
  const acc_t* RSTD = rstd.const_data_ptr<acc_t>();
  scalar_t* DX = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* DG = dgamma.mutable_data_ptr<acc_t>();  // [B, M, C] partial sums, reduced over B by the caller
  acc_t* DB = dbeta.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1));
  at::parallel_for(0, mean.numel(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / G, g = t % G, m = pair % M;
      const int64_t part = pair * C + g * Cg;  // this group's first channel in the [B, M, C] partials
      if (!P[pair]) {
        if (DX) std::fill(DX + t * n, DX + (t + 1) * n, scalar_t(0));
        std::fill(DG + part, DG + part + Cg, acc_t(0));
        std::fill(DB + part, DB + part + Cg, acc_t(0));
        continue;
      }
      const acc_t mu = MEAN[t], rs = RSTD[t];
      // Pass 1: per channel, sum dz and sum dz * xhat (dz = dy * act'(z)); their w-weighted sums over the group
      // give mean(dxhat) and mean(dxhat * xhat) of the GroupNorm backward.
      double sum_w_dz = 0, sum_w_dz_xhat = 0;
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = m * C + g * Cg + c;
        const acc_t a = rs * W[ch], s = Bi[ch] - mu * a;
        const scalar_t* xc = X + t * n + c * L;
        const scalar_t* gc = GY + t * n + c * L;
        double dz_sum = 0, dz_xc_sum = 0;
        for (int64_t start = 0; start < L; start += kBlock) {
          const int64_t stop = std::min(L, start + kBlock);
          // kLanes independent accumulators, as in blocked_sums: a single serial sum would not vectorise.
          acc_t s1[kLanes] = {}, s2[kLanes] = {};
          int64_t l = start;
          for (; l + kLanes <= stop; l += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) {
              const acc_t xv = static_cast<acc_t>(xc[l + k]);
              const acc_t dz = static_cast<acc_t>(gc[l + k]) * activate_grad<A>(xv * a + s);
              s1[k] += dz;
              s2[k] += dz * (xv - mu);
            }
          }
          for (; l < stop; ++l) {
            const acc_t xv = static_cast<acc_t>(xc[l]);
            const acc_t dz = static_cast<acc_t>(gc[l]) * activate_grad<A>(xv * a + s);
            s1[0] += dz;
            s2[0] += dz * (xv - mu);
          }
          for (int64_t k = 0; k < kLanes; ++k) {
            dz_sum += s1[k];
            dz_xc_sum += s2[k];
          }
        }
        const double dz_xhat_sum = dz_xc_sum * rs;
        DB[part + c] = static_cast<acc_t>(dz_sum);
        DG[part + c] = static_cast<acc_t>(dz_xhat_sum);
        sum_w_dz += W[ch] * dz_sum;
        sum_w_dz_xhat += W[ch] * dz_xhat_sum;
      }
      if (!DX) continue;
      // Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dz * w.
      const acc_t c1 = static_cast<acc_t>(sum_w_dz / n), c2 = static_cast<acc_t>(sum_w_dz_xhat / n);
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = m * C + g * Cg + c;
        const acc_t wc = W[ch], bc = Bi[ch];
        const scalar_t* xc = X + t * n + c * L;
        const scalar_t* gc = GY + t * n + c * L;
        scalar_t* dc = DX + t * n + c * L;
        const acc_t rw = rs * wc, rc1 = rs * c1, rc2 = rs * c2;
        for (int64_t l = 0; l < L; ++l) {
          const acc_t xhat = (static_cast<acc_t>(xc[l]) - mu) * rs;
          const acc_t g = static_cast<acc_t>(gc[l]) * activate_grad<A>(xhat * wc + bc);
          dc[l] = static_cast<scalar_t>(g * rw - rc1 - xhat * rc2);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_group_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                           const at::Tensor& bias,
                                                                           const at::Tensor& present, int64_t num_groups,
                                                                           double eps, c10::string_view activation) {
  const int64_t L = check_group_norm_args(x, weight, bias, present, num_groups);
  const Activation act = parse_activation(activation);
  check_group_norm_eps(eps);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xc = x.contiguous();
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const auto pc = present.contiguous();
  auto y = at::empty_like(xc);
  auto mean = at::empty({x.size(0), x.size(1), num_groups}, x.options().dtype(acc));
  auto rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_fwd_cpu", [&] {
    dispatch_activation(act, [&](auto a) {
      group_norm_fwd_kernel<scalar_t, decltype(a)::value>(xc, w, b, pc, num_groups, L, eps, y, mean, rstd);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_group_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& present, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const int64_t L = check_group_norm_args(x, weight, bias, present, num_groups);
  const Activation act = parse_activation(activation);
  check_group_norm_bwd_args(grad_y, x, mean, rstd, num_groups);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xc = x.contiguous(), gc = grad_y.to(x.scalar_type()).contiguous();
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const auto pc = present.contiguous();
  const auto mc = mean.to(acc).contiguous(), rc = rstd.to(acc).contiguous();
  at::Tensor dx = output_mask[0] ? at::empty_like(xc) : at::Tensor();
  auto dgamma = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(acc));
  auto dbeta = at::empty_like(dgamma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_bwd_cpu", [&] {
    dispatch_activation(act, [&](auto a) {
      group_norm_bwd_kernel<scalar_t, decltype(a)::value>(gc, xc, w, b, pc, mc, rc, num_groups, L, dx, dgamma,
                                                           dbeta);
    });
  });
  // The per-pair partials [B, M, C] are reduced over the batch here: absent pairs contributed zeros.
  at::Tensor dw = output_mask[1] ? dgamma.sum(0).to(weight.scalar_type()) : at::Tensor();
  at::Tensor db = output_mask[2] ? dbeta.sum(0).to(bias.scalar_type()) : at::Tensor();
  return {dx, dw, db};
}

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) {
  m.impl("modality_group_norm_fwd", &gmd_ext::modality_group_norm_fwd_cpu);
  m.impl("modality_group_norm_bwd", &gmd_ext::modality_group_norm_bwd_cpu);
}
