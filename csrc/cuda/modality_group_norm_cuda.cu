// modality_group_norm on CUDA: one thread block per (b, m, group) task t = (b * M + m) * G + g, whose n = C / G * L
// elements are the contiguous range [t * n, (t + 1) * n) of x [B, M, C, L]. Absent pairs only write zeros.
// Same algorithm as csrc/cpu/modality_group_norm_cpu.cpp (two-pass statistics, fp32 accumulation).
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

template <typename acc_t>
using BlockReduce = cub::BlockReduce<acc_t, kThreads>;

// Block-wide sum broadcast to every thread.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, typename BlockReduce<acc_t>::TempStorage& tmp, acc_t* shared_result) {
  const acc_t s = BlockReduce<acc_t>(tmp).Sum(v);
  if (threadIdx.x == 0) *shared_result = s;
  __syncthreads();
  const acc_t out = *shared_result;
  __syncthreads();  // tmp and shared_result are reused by the next reduction
  return out;
}

template <typename scalar_t, Activation A>
__global__ void group_norm_fwd_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ w,
                                      const at::opmath_type<scalar_t>* __restrict__ b, const bool* __restrict__ present,
                                      scalar_t* __restrict__ y, at::opmath_type<scalar_t>* __restrict__ mean,
                                      at::opmath_type<scalar_t>* __restrict__ rstd, int64_t M, int64_t C, int64_t G,
                                      int64_t L, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename BlockReduce<acc_t>::TempStorage tmp;
  __shared__ acc_t result;
  const int64_t t = blockIdx.x, pair = t / G, g = t % G, m = pair % M;
  const int64_t Cg = C / G, n = Cg * L;
  const scalar_t* xg = x + t * n;
  scalar_t* yg = y + t * n;
  if (!present[pair]) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yg[i] = scalar_t(0);
    if (threadIdx.x == 0) mean[t] = rstd[t] = acc_t(0);
    return;
  }
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<acc_t>(xg[i]);
  const acc_t mu = block_sum(s, tmp, &result) / n;
  // Centred second pass: the group is re-read from L2 (<= a few MiB per block), no cancellation.
  acc_t ss = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(xg[i]) - mu;
    ss += d * d;
  }
  const acc_t rs = static_cast<acc_t>(rsqrt(static_cast<double>(block_sum(ss, tmp, &result) / n) + eps));
  if (threadIdx.x == 0) {
    mean[t] = mu;
    rstd[t] = rs;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t ch = m * C + g * Cg + i / L;
    yg[i] = static_cast<scalar_t>(activate<A>((static_cast<acc_t>(xg[i]) - mu) * rs * w[ch] + b[ch]));
  }
}

template <typename scalar_t, Activation A>
__global__ void group_norm_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                      const at::opmath_type<scalar_t>* __restrict__ w,
                                      const at::opmath_type<scalar_t>* __restrict__ b, const bool* __restrict__ present,
                                      const at::opmath_type<scalar_t>* __restrict__ mean,
                                      const at::opmath_type<scalar_t>* __restrict__ rstd, scalar_t* __restrict__ dx,
                                      at::opmath_type<scalar_t>* __restrict__ dgamma,
                                      at::opmath_type<scalar_t>* __restrict__ dbeta, int64_t M, int64_t C, int64_t G,
                                      int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ typename BlockReduce<acc_t>::TempStorage tmp;
  __shared__ acc_t result;
  const int64_t t = blockIdx.x, pair = t / G, g = t % G, m = pair % M;
  const int64_t Cg = C / G, n = Cg * L, part = pair * C + g * Cg;
  if (!present[pair]) {
    if (dx) for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dx[t * n + i] = scalar_t(0);
    for (int64_t c = threadIdx.x; c < Cg; c += blockDim.x) dgamma[part + c] = dbeta[part + c] = acc_t(0);
    return;
  }
  const acc_t mu = mean[t], rs = rstd[t];
  // Pass 1, per channel: sum dz and sum dz * xhat (dz = dy * act'(z)) -> dbeta, dgamma partials [B, M, C] (reduced
  // over B by the caller: deterministic, no atomics); their w-weighted sums give the GroupNorm backward means.
  acc_t sum_w_dz = 0, sum_w_dz_xhat = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    const int64_t ch = m * C + g * Cg + c;
    const acc_t wc = w[ch], bc = b[ch];
    const scalar_t* xc = x + t * n + c * L;
    const scalar_t* gc = gy + t * n + c * L;
    acc_t s1 = 0, s2 = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const acc_t xhat = (static_cast<acc_t>(xc[l]) - mu) * rs;
      const acc_t dz = static_cast<acc_t>(gc[l]) * activate_grad<A>(xhat * wc + bc);
      s1 += dz;
      s2 += dz * xhat;
    }
    s1 = block_sum(s1, tmp, &result);
    s2 = block_sum(s2, tmp, &result);
    if (threadIdx.x == 0) {
      dbeta[part + c] = s1;
      dgamma[part + c] = s2;
    }
    sum_w_dz += wc * s1;
    sum_w_dz_xhat += wc * s2;
  }
  if (!dx) return;
  // Pass 2: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dz * w.
  const acc_t c1 = sum_w_dz / n, c2 = sum_w_dz_xhat / n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t ch = m * C + g * Cg + i / L;
    const acc_t wc = w[ch];
    const acc_t xhat = (static_cast<acc_t>(x[t * n + i]) - mu) * rs;
    const acc_t dz = static_cast<acc_t>(gy[t * n + i]) * activate_grad<A>(xhat * wc + b[ch]);
    dx[t * n + i] = static_cast<scalar_t>(rs * (dz * wc - c1 - xhat * c2));
  }
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&](auto a) {
      group_norm_fwd_kernel<scalar_t, decltype(a)::value><<<tasks, kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
          pc.const_data_ptr<bool>(), y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), x.size(1), x.size(2), num_groups, L, eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_group_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& present, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const int64_t L = check_group_norm_args(x, weight, bias, present, num_groups);
  const Activation act = parse_activation(activation);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "modality_group_norm_bwd: grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xc = x.contiguous(), gc = grad_y.to(x.scalar_type()).contiguous();
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const auto pc = present.contiguous();
  const auto mc = mean.to(acc).contiguous(), rc = rstd.to(acc).contiguous();
  at::Tensor dx = output_mask[0] ? at::empty_like(xc) : at::Tensor();
  auto dgamma = at::zeros({x.size(0), x.size(1), x.size(2)}, x.options().dtype(acc));
  auto dbeta = at::zeros_like(dgamma);
  const int64_t tasks = mc.numel();
  if (tasks > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_group_norm_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_activation(act, [&](auto a) {
        group_norm_bwd_kernel<scalar_t, decltype(a)::value><<<tasks, kThreads, 0, stream>>>(
            gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>(), pc.const_data_ptr<bool>(), mc.const_data_ptr<acc_t>(),
            rc.const_data_ptr<acc_t>(), dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr,
            dgamma.mutable_data_ptr<acc_t>(), dbeta.mutable_data_ptr<acc_t>(), x.size(1), x.size(2), num_groups, L);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
