// Calls the gmd_ext ops from C++ through the dispatcher and checks them against plain ATen:
// gram against G G^T, and the two-pass projection (gram -> pcgrad_coefficients -> combine) against the
// literal pairwise loop of the official GMD implementation. Exits non-zero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Official GMD merge on K rows: project each g_i against every original g_j (order perms[i]) it conflicts
// with, then average over objectives (every element shared).
at::Tensor pairwise_mean(const at::Tensor& G, const at::Tensor& perms) {
  const at::Tensor g = G.to(at::kDouble);
  const int64_t K = g.size(0);
  at::Tensor merged = at::zeros({g.size(1)}, g.options());
  for (int64_t i = 0; i < K; ++i) {
    at::Tensor gi = g[i].clone();
    for (int64_t t = 0; t < K; ++t) {
      const at::Tensor gj = g[perms[i][t].item<int64_t>()];
      const double dot = at::dot(gi, gj).item<double>();
      if (dot < 0) gi -= dot / at::dot(gj, gj).item<double>() * gj;
    }
    merged += gi;
  }
  return merged / static_cast<double>(K);
}

bool report(const char* what, const at::Tensor& got, const at::Tensor& want, double rtol, double atol) {
  const bool ok = at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol);
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  std::printf("%-28s max abs error %.3e  %s\n", what, err, ok ? "ok" : "MISMATCH");
  return ok;
}

}  // namespace

int main() {
  const auto gram = op<at::Tensor(const at::Tensor&)>("gmd_ext::gram");
  const auto coefficients = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("gmd_ext::pcgrad_coefficients");
  const auto combine =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double)>(
          "gmd_ext::combine");

  at::manual_seed(0);
  bool ok = true;

  const at::Tensor G = at::randn({5, 10007});
  ok &= report("gram vs G G^T", gram.call(G), at::matmul(G.to(at::kDouble), G.to(at::kDouble).t()), 1e-5, 1e-3);

  // Tiny conflicting case: rows 0 and 1 point in opposite-ish directions, row 2 agrees with both.
  const at::Tensor g = at::tensor({1.0f, 0.5f, 0.0f, -0.8f, 0.2f, 0.3f, 0.1f, 0.1f, 1.0f}).view({3, 3});
  const at::Tensor perms = at::tensor({1, 2, 0, 0, 2, 1, 2, 1, 0}, at::kLong).view({3, 3});
  const int64_t K = g.size(0);
  const at::Tensor A = coefficients.call(gram.call(g), perms);
  const at::Tensor merged = combine.call(g, A.sum(0), std::nullopt, 1.0 / K, 1.0);
  ok &= report("projection vs pairwise loop", merged, pairwise_mean(g, perms), 1e-5, 1e-6);

  const at::Tensor Gb = at::randn({4, 3001});
  const at::Tensor pb = at::stack({at::randperm(4), at::randperm(4), at::randperm(4), at::randperm(4)});
  const at::Tensor Ab = coefficients.call(gram.call(Gb), pb);
  ok &= report("projection K=4 N=3001", combine.call(Gb, Ab.sum(0), std::nullopt, 0.25, 1.0),
               pairwise_mean(Gb, pb), 1e-4, 1e-5);

  std::printf("%s\n", ok ? "all checks passed" : "FAILED");
  return ok ? 0 : 1;
}
