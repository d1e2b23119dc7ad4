// modality_group_norm (Dynamic Sharing, docs/design.md): GroupNorm statistics per (b, m) pair, affine parameters per
// modality [M, C], optional fused ReLU / LeakyReLU(0.01); absent pairs are skipped (zeros out, no gradient).
//
// x [B, M, C, L] contiguous (L = prod(*S)) puts group g of pair (b, m) at the contiguous range
// [t * n, (t + 1) * n) with t = (b * M + m) * G + g and n = C / G * L, so one task per t needs no index math.
// Statistics: the moments of chunks of kBlock elements, each scaled by a power of two from its max |x|, merged in
// order (csrc/ds_common.h): exact from all-subnormal groups to values near the dtype's max, as on every backend.
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
constexpr int64_t kBlock = 1024;    // statistics chunk (csrc/ds_common.h): 4-8 KB, its three passes hit L1

// sum of f(p[i]) over p[0, len), fp32 (acc_t) lanes folded into a double: len <= kBlock bounds the fp32 error.
template <typename acc_t, typename scalar_t, typename F>
double lane_sum(const scalar_t* p, int64_t len, F f) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += f(static_cast<acc_t>(p[i + k]));
  }
  for (; i < len; ++i) lanes[0] += f(static_cast<acc_t>(p[i]));
  acc_t total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// max |p[i]| over p[0, len): fabs and a select (a branch on the sign of random data ran ~15x slower, measured on
// the 2-core dev box). NaN drops out of the max but reaches the sums of chunk_moments, which propagate it.
template <typename acc_t, typename scalar_t>
acc_t lane_max_abs(const scalar_t* p, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t a = std::fabs(static_cast<acc_t>(p[i + k]));
      lanes[k] = lanes[k] < a ? a : lanes[k];
    }
  }
  for (; i < len; ++i) {
    const acc_t a = std::fabs(static_cast<acc_t>(p[i]));
    lanes[0] = lanes[0] < a ? a : lanes[0];
  }
  acc_t m = 0;
  for (int64_t k = 0; k < kLanes; ++k) m = m < lanes[k] ? lanes[k] : m;
  return m;
}

// The moments of one chunk p[0, len) (csrc/ds_common.h): max |v| for the exponent, the scaled sum for the centre,
// then the centred scaled sums. The chunk stays in L1 for these passes: one read of it from memory. (Fusing the
// passes measured slower on the 2-core dev box: GCC then vectorised fewer of the loops.)
template <typename acc_t, typename scalar_t>
GnMoments chunk_moments(const scalar_t* p, int64_t len) {
  const int e = gn_exponent(lane_max_abs<acc_t>(p, len));
  const GnScale<acc_t> sc = gn_scale<acc_t>(e);
  const acc_t c = static_cast<acc_t>(lane_sum<acc_t>(p, len, sc) / len);
  const double sd = lane_sum<acc_t>(p, len, [sc, c](acc_t v) { return sc(v) - c; });
  const double sd2 = lane_sum<acc_t>(p, len, [sc, c](acc_t v) { return (sc(v) - c) * (sc(v) - c); });
  return gn_chunk_moments(static_cast<double>(len), e, c, sd, sd2);
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
      // Chunks merged in order (csrc/ds_common.h: exact at any magnitude, subnormal to the dtype's max).
      GnMoments mom{0, 0, 0, 0};
      for (int64_t start = 0; start < n; start += kBlock) {
        mom = gn_merge(mom, chunk_moments<acc_t>(xg + start, std::min(kBlock, n - start)));
      }
      const GnStats st = gn_finalize(mom, eps);
      const acc_t mu = static_cast<acc_t>(st.mean), rs = static_cast<acc_t>(st.rstd);
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
      const acc_t rs = RSTD[t];
      const GnNormalizer<acc_t> xhat_of = gn_normalizer(MEAN[t], rs);
      // Pass 1: per channel, sum dz and sum dz * xhat (dz = dy * act'(z)); their w-weighted sums over the group
      // give mean(dxhat) and mean(dxhat * xhat) of the GroupNorm backward. xhat, not x - mu, is summed: dz * (x - mu)
      // overflows fp32 sums for |x| near fp32's max (and xhat_of, csrc/ds_common.h, never forms x - mu).
      double sum_w_dz = 0, sum_w_dz_xhat = 0;
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = m * C + g * Cg + c;
        const acc_t wc = W[ch], bc = Bi[ch];
        const scalar_t* xc = X + t * n + c * L;
        const scalar_t* gc = GY + t * n + c * L;
        double dz_sum = 0, dz_xhat_sum = 0;
        for (int64_t start = 0; start < L; start += kBlock) {
          const int64_t stop = std::min(L, start + kBlock);
          // kLanes independent accumulators, as in lane_sum: a single serial sum would not vectorise.
          acc_t s1[kLanes] = {}, s2[kLanes] = {};
          int64_t l = start;
          for (; l + kLanes <= stop; l += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) {
              const acc_t xhat = xhat_of(static_cast<acc_t>(xc[l + k]));
              const acc_t dz = static_cast<acc_t>(gc[l + k]) * activate_grad<A>(xhat * wc + bc);
              s1[k] += dz;
              s2[k] += dz * xhat;
            }
          }
          for (; l < stop; ++l) {
            const acc_t xhat = xhat_of(static_cast<acc_t>(xc[l]));
            const acc_t dz = static_cast<acc_t>(gc[l]) * activate_grad<A>(xhat * wc + bc);
            s1[0] += dz;
            s2[0] += dz * xhat;
          }
          for (int64_t k = 0; k < kLanes; ++k) {
            dz_sum += s1[k];
            dz_xhat_sum += s2[k];
          }
        }
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
          const acc_t xhat = xhat_of(static_cast<acc_t>(xc[l]));
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
