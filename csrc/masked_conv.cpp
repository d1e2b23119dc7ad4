// masked_conv (Dynamic Sharing, docs/design.md): convolve only the present (b, m) pairs.
//
// The op is a composition pack_pairs -> at::convolution (oneDNN here, cuDNN on CUDA) -> scatter_pairs, written
// once and registered for CPU and CUDA from here; only the row gather/scatter kernels are device specific
// (csrc/cpu/masked_conv_cpu.cpp, csrc/cuda/masked_conv_cuda.cu). It is an explicit op with its own backward op
// (autograd in gmd_ext/ops/_registry.py) rather than CompositeImplicitAutograd because the pair count P is data
// dependent: as one opaque op its output shape [B, M, Cout, *S'] is static, so torch.compile(fullgraph=True)
// needs no data-dependent shapes and autograd never sees the packed [P, ...] intermediates. The pair plan
// (index on the device, counts on the host) is an input built once per forward from the host-side mask, so
// nothing here reads device memory on the host: no nonzero, no .cpu(), no synchronisation.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ds_common.h"

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

namespace gmd_ext {

namespace {

at::Tensor call_pack(const at::Tensor& x, const at::Tensor& index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gmd_ext::pack_pairs", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, index);
}

at::Tensor call_scatter(const at::Tensor& y, const at::Tensor& index, int64_t num_pairs) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gmd_ext::scatter_pairs", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(y, index, num_pairs);
}

// How the present pairs are laid out for the vendor convolution.
//  kShared:  shared weight and bias: pack the P present rows, one convolution with batch P.
//  kGrouped: per-modality weight or bias: slot (i, m) holds modality m's i-th present pair (-1: an empty slot,
//            packed as zeros), viewed as [Pmax, M * Cin, *S] and run as ONE grouped convolution (groups = M).
//            Measured on the 2-core dev box (32^3, 16 -> 16 channels, 3^3 kernel): a batch-1 convolution takes
//            ATen's native path (oneDNN only above N*C*D*H = 20480 for batch 1) at 209 ms against 91 ms for
//            batch 2, while the grouped form costs the same as a batch-P shared convolution.
//  kLoop:    per modality, when the grouped layout would waste more than half its slots (unbalanced masks):
//            one convolution per modality on its contiguous slice of the modality-major packed rows.
enum class Layout { kShared, kGrouped, kLoop };

struct Plan {
  Layout layout;
  at::Tensor index;             // kShared / kLoop: [P] flat b * M + m, modality-major; kGrouped: [Pmax * M] slots
  std::vector<int64_t> counts;  // present pairs per modality (kLoop)
  int64_t slots = 0;            // Pmax (kGrouped)
};

// The layout from the host-side counts alone: no device value is read, so the op never synchronises.
Plan plan_pairs(const at::Tensor& index, at::IntArrayRef counts, bool per_modality) {
  const int64_t M = static_cast<int64_t>(counts.size());
  Plan p{Layout::kShared, index, counts.vec()};
  if (!per_modality) return p;
  const int64_t P = index.numel();
  const int64_t pmax = P ? *std::max_element(counts.begin(), counts.end()) : 0;
  if (P == 0 || M * pmax > 2 * P) {
    p.layout = Layout::kLoop;
    return p;
  }
  // Slot (i, m) = modality m's i-th present pair, -1 past its count: each modality's contiguous segment of the
  // modality-major index padded to Pmax, interleaved [Pmax, M] -> slot i * M + m.
  std::vector<at::Tensor> columns;
  int64_t start = 0;
  for (int64_t m = 0; m < M; ++m) {
    auto col = at::full({pmax}, -1, index.options());
    col.narrow(0, 0, counts[m]).copy_(index.narrow(0, start, counts[m]));
    columns.push_back(col);
    start += counts[m];
  }
  p.layout = Layout::kGrouped;
  p.index = at::stack(columns, 1).flatten();
  p.slots = pmax;
  return p;
}

// [B, M, C, *S] -> [B * M, C, *S]
at::Tensor flat_pairs(const at::Tensor& t) {
  auto s = t.sizes().vec();
  s.erase(s.begin());
  s[0] = t.size(0) * t.size(1);
  return t.reshape(s);
}

// [R, C, *S] -> [R / groups, groups * C, *S] and back: the grouped convolution's view of the slots.
at::Tensor to_groups(const at::Tensor& t, int64_t groups) {
  auto s = t.sizes().vec();
  s[0] /= groups;
  s[1] *= groups;
  return t.reshape(s);
}

at::Tensor from_groups(const at::Tensor& t, int64_t groups) {
  auto s = t.sizes().vec();
  s[0] *= groups;
  s[1] /= groups;
  return t.reshape(s);
}

// The grouped convolution's weight [M * Cout, Cin, *k] and bias [M * Cout] (shared ones repeated per modality).
at::Tensor grouped_weight(const at::Tensor& weight, bool per_weight, int64_t M) {
  if (per_weight) return weight.flatten(0, 1);
  std::vector<int64_t> reps(weight.dim(), 1);
  reps[0] = M;
  return weight.repeat(reps);
}

std::optional<at::Tensor> grouped_bias(const std::optional<at::Tensor>& bias, int64_t M) {
  if (!bias.has_value()) return std::nullopt;
  return bias->dim() == 2 ? bias->flatten() : bias->repeat({M});
}

// masked_conv / masked_conv_backward: the same checks on every device; the index values are checked where they
// are readable without a synchronisation (on the host).
void check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& index, at::IntArrayRef counts,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nsp = x.dim() - 3;
  TORCH_CHECK_VALUE(nsp >= 1 && nsp <= 3, op, ": x must be [B, M, Cin, *S] with 1-3 spatial dims, got ",
                    x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
                   x.scalar_type());
  const int64_t B = x.size(0), M = x.size(1), Cin = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == nsp + 2 || (weight.dim() == nsp + 3 && weight.size(0) == M), op,
                    ": weight must be [Cout, Cin, *k] or [M, Cout, Cin, *k] with M = ", M, ", got ",
                    weight.sizes(), " for x ", x.sizes());
  const bool per_weight = weight.dim() == nsp + 3;
  const int64_t Cout = weight.size(per_weight ? 1 : 0);
  TORCH_CHECK_VALUE(weight.size(per_weight ? 2 : 1) == Cin, op, ": weight's Cin must equal x.size(2) = ", Cin,
                    ", got weight ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ",
                   x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(), ", got ",
                    weight.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE((bias->dim() == 1 && bias->size(0) == Cout) ||
                          (bias->dim() == 2 && bias->size(0) == M && bias->size(1) == Cout),
                      op, ": bias must be [Cout] = [", Cout, "] or [M, Cout] = [", M, ", ", Cout, "], got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                     ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias must be on x's device ", x.device(), ", got ",
                      bias->device());
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(stride.size()) == nsp && static_cast<int64_t>(padding.size()) == nsp &&
                        static_cast<int64_t>(dilation.size()) == nsp,
                    op, ": stride, padding and dilation need one entry per spatial dim (", nsp, "), got ", stride,
                    ", ", padding, ", ", dilation);
  for (int64_t d = 0; d < nsp; ++d) {
    TORCH_CHECK_VALUE(stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, op,
                      ": stride and dilation must be >= 1 and padding >= 0, got stride ", stride, ", padding ",
                      padding, ", dilation ", dilation);
    const int64_t k = weight.size(weight.dim() - nsp + d);
    TORCH_CHECK_VALUE(x.size(3 + d) + 2 * padding[d] - dilation[d] * (k - 1) - 1 >= 0, op, ": spatial dim ", d,
                      " of x (", x.size(3 + d), ") with padding ", padding[d],
                      " is smaller than the dilated kernel ", dilation[d] * (k - 1) + 1);
  }
  check_index(op, index, x, "x");
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == M, op, ": counts must hold one pair count per modality (",
                    M, "), got ", counts.size());
  int64_t P = 0;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_VALUE(counts[m] >= 0 && counts[m] <= B, op, ": counts[", m, "] = ", counts[m],
                      " must lie in [0, B = ", B, "]");
    P += counts[m];
  }
  TORCH_CHECK_VALUE(P == index.numel(), op, ": counts sum to ", P, " but index has ", index.numel(), " entries");
  if (index.is_cpu()) {
    // Modality-major and in range; distinctness is checked by pack_pairs on the same host data.
    const auto ic = index.contiguous();
    const int64_t* idx = ic.const_data_ptr<int64_t>();
    int64_t i = 0;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < counts[m]; ++n, ++i) {
        TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < B * M && idx[i] % M == m, op, ": index[", i, "] = ", idx[i],
                          " must be a pair b * M + m of modality ", m,
                          " (index is modality-major: counts[0] pairs of modality 0 first, ...)");
      }
    }
  }
}

// [B, M, Cout, *S'] of the convolution of x by weight.
std::vector<int64_t> conv_out_sizes(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nsp = x.dim() - 3;
  const bool per_weight = weight.dim() == nsp + 3;
  std::vector<int64_t> s{x.size(0), x.size(1), weight.size(per_weight ? 1 : 0)};
  for (int64_t d = 0; d < nsp; ++d) {
    const int64_t k = weight.size(weight.dim() - nsp + d);
    s.push_back((x.size(3 + d) + 2 * padding[d] - dilation[d] * (k - 1) - 1) / stride[d] + 1);
  }
  int64_t row = x.element_size();
  for (size_t d = 2; d < s.size(); ++d) row = s[d] > 0 && row > INT64_MAX / s[d] ? INT64_MAX : row * s[d];
  check_output_fits("masked_conv", ("output size from padding " + c10::str(padding)).c_str(), s[0] * s[1], row);
  return s;
}

}  // namespace

at::Tensor masked_conv_composite(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& index, at::IntArrayRef counts, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_args("masked_conv", x, weight, bias, index, counts, stride, padding, dilation);
  conv_out_sizes(x, weight, stride, padding, dilation);  // refuses an output that cannot fit, naming the padding
  const int64_t nsp = x.dim() - 3, B = x.size(0), M = x.size(1);
  const bool per_weight = weight.dim() == nsp + 3;
  const bool per_bias = bias.has_value() && bias->dim() == 2;
  const std::vector<int64_t> no_output_padding(nsp, 0);
  const auto plan = plan_pairs(index, counts, per_weight || per_bias);
  const auto xp = call_pack(flat_pairs(x), plan.index);
  const auto conv = [&](const at::Tensor& in, const at::Tensor& w, const std::optional<at::Tensor>& b,
                        int64_t groups) {
    return at::convolution(in, w, b, stride, padding, dilation, false, no_output_padding, groups);
  };
  const auto weight_of = [&](int64_t m) { return per_weight ? weight.select(0, m) : weight; };
  at::Tensor yp;
  if (plan.layout == Layout::kShared) {
    yp = conv(xp, weight, bias, 1);
  } else if (plan.layout == Layout::kGrouped) {
    yp = from_groups(conv(to_groups(xp, M), grouped_weight(weight, per_weight, M), grouped_bias(bias, M), M), M);
  } else {
    std::vector<at::Tensor> pieces;
    int64_t start = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = plan.counts[m];
      if (n == 0) continue;
      std::optional<at::Tensor> b;
      if (bias.has_value()) b = per_bias ? bias->select(0, m) : *bias;
      pieces.push_back(conv(xp.narrow(0, start, n), weight_of(m), b, 1));
      start += n;
    }
    // No pair present anywhere: an empty-batch convolution still gives the output shape.
    yp = pieces.empty() ? conv(xp, weight_of(0), std::nullopt, 1) : (pieces.size() == 1 ? pieces[0] : at::cat(pieces));
  }
  auto ys = yp.sizes().vec();
  ys[0] = M;
  ys.insert(ys.begin(), B);
  return call_scatter(yp, plan.index, B * M).view(ys);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv_backward_composite(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& index, at::IntArrayRef counts, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "masked_conv_backward";
  check_conv_args(op, x, weight, bias, index, counts, stride, padding, dilation);
  const auto y_sizes = conv_out_sizes(x, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(y_sizes), op, ": grad_y must be the output's shape ",
                    at::IntArrayRef(y_sizes), ", got ", grad_y.dim(), "-D ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ", x.scalar_type(),
                   ", got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), op, ": grad_y must be on x's device ", x.device(), ", got ",
                    grad_y.device());
  const int64_t nsp = x.dim() - 3, B = x.size(0), M = x.size(1);
  const bool per_weight = weight.dim() == nsp + 3;
  const bool per_bias = bias.has_value() && bias->dim() == 2;
  const bool need_bias = output_mask[2] && bias.has_value();
  const std::vector<int64_t> no_output_padding(nsp, 0);
  const auto plan = plan_pairs(index, counts, per_weight || per_bias);
  const auto xp = call_pack(flat_pairs(x), plan.index);
  const auto gp = call_pack(flat_pairs(grad_y), plan.index);
  const int64_t Cout = per_weight ? weight.size(1) : weight.size(0);
  const auto conv_backward = [&](const at::Tensor& g, const at::Tensor& in, const at::Tensor& w, int64_t groups) {
    const std::vector<int64_t> bias_sizes{w.size(0)};
    return at::convolution_backward(
        g, in, w, need_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride, padding,
        dilation, false, no_output_padding, groups, {output_mask[0], output_mask[1], need_bias});
  };
  at::Tensor dxp, dw, db;
  if (plan.layout == Layout::kShared) {
    if (xp.size(0) > 0) {
      std::tie(dxp, dw, db) = conv_backward(gp, xp, weight, 1);
    } else {
      dxp = output_mask[0] ? at::zeros_like(xp) : at::Tensor();
      dw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::Tensor();
      db = need_bias ? at::zeros(bias->sizes(), bias->options()) : at::Tensor();
    }
  } else if (plan.layout == Layout::kGrouped) {
    // Empty slots hold zero inputs and zero grads, so they add nothing to dw / db.
    auto [gx, gw, gb] = conv_backward(to_groups(gp, M), to_groups(xp, M), grouped_weight(weight, per_weight, M), M);
    if (output_mask[0]) dxp = from_groups(gx, M);
    if (output_mask[1]) dw = per_weight ? gw.view(weight.sizes()) : gw.unflatten(0, {M, Cout}).sum(0);
    if (need_bias) db = per_bias ? gb.view({M, Cout}) : gb.view({M, Cout}).sum(0);
  } else {
    // Accumulate into zeros, so a modality without pairs gets zeros.
    dxp = output_mask[0] ? at::zeros_like(xp) : at::Tensor();
    dw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::Tensor();
    db = need_bias ? at::zeros(bias->sizes(), bias->options()) : at::Tensor();
    int64_t start = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = plan.counts[m];
      if (n > 0) {
        auto [gx, gw, gb] = conv_backward(gp.narrow(0, start, n), xp.narrow(0, start, n),
                                          per_weight ? weight.select(0, m) : weight, 1);
        if (output_mask[0]) dxp.narrow(0, start, n).copy_(gx);
        if (output_mask[1]) (per_weight ? dw.select(0, m) : dw).add_(gw);
        if (need_bias) (per_bias ? db.select(0, m) : db).add_(gb);
      }
      start += n;
    }
  }
  at::Tensor dx;
  if (output_mask[0]) dx = call_scatter(dxp, plan.index, B * M).view(x.sizes());
  // Contiguous, as the fake kernel says (the vendor backward may pick another weight layout).
  return {dx, dw.defined() ? dw.contiguous() : dw, db};
}

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) {
  m.impl("masked_conv", &gmd_ext::masked_conv_composite);
  m.impl("masked_conv_backward", &gmd_ext::masked_conv_backward_composite);
}

#ifdef GMD_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) {
  m.impl("masked_conv", &gmd_ext::masked_conv_composite);
  m.impl("masked_conv_backward", &gmd_ext::masked_conv_backward_composite);
}
#endif
