// pcgrad_coefficients(gram [K, K] fp32, perms [K, K] int64) -> A [K, K] fp32, CPU.
//
// The sequential GMD projection loop run on K x K numbers instead of K x N (docs/design.md): row i of A starts as
// e_i and v = A_i Gamma holds g_i' . g_j for every j; projecting against g_j (v_j < 0 and Gamma_jj > 0)
// changes only A_ij and updates v with row j of Gamma. Rows are independent. Computed in fp64 so the
// coefficients carry no more error than the fp32 Gramian they come from.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../projection_checks.h"

#include <algorithm>
#include <vector>

namespace gmd_ext::cpu {

at::Tensor pcgrad_coefficients_cpu(const at::Tensor& gram, const at::Tensor& perms) {
  constexpr const char* op = "gmd_ext::pcgrad_coefficients";
  const int64_t K = check_pcgrad_args(op, gram, perms, at::kCPU, "CPU");

  const at::Tensor g = gram.to(at::kDouble).contiguous();
  const at::Tensor p = perms.contiguous();
  const double* Gm = g.const_data_ptr<double>();
  const int64_t* P = p.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < K * K; ++t) {
    TORCH_CHECK_VALUE(P[t] >= 0 && P[t] < K, op, ": perms[", t / K, "][", t % K, "] = ", P[t],
                " is not an objective index in [0, ", K, ")");
  }
  at::Tensor A = at::zeros({K, K}, g.options());
  double* a = A.data_ptr<double>();
  // K^2 work per row: split rows across threads only when there are enough of them to pay for it.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * K, 1));
  at::parallel_for(0, K, grain, [&](int64_t i_begin, int64_t i_end) {
    std::vector<double> v(K);
    for (int64_t i = i_begin; i < i_end; ++i) {
      double* ai = a + i * K;
      ai[i] = 1.0;
      for (int64_t l = 0; l < K; ++l) v[l] = Gm[i * K + l];
      for (int64_t t = 0; t < K; ++t) {
        const int64_t j = P[i * K + t];
        const double d = v[j], norm2 = Gm[j * K + j];
        if (d < 0 && norm2 > 0) {
          const double alpha = d / norm2;
          ai[j] -= alpha;
          for (int64_t l = 0; l < K; ++l) v[l] -= alpha * Gm[j * K + l];
        }
      }
    }
  });
  return A.to(at::kFloat);
}

}  // namespace gmd_ext::cpu

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) { m.impl("pcgrad_coefficients", &gmd_ext::cpu::pcgrad_coefficients_cpu); }
