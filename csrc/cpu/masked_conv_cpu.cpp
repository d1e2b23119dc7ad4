// masked_conv (Dynamic Sharing, DESIGN §3): convolve only the present (b, m) pairs.
//
// The op is a composition pack_pairs -> at::convolution (oneDNN here, cuDNN on CUDA) -> scatter_pairs, written
// once below and registered for CPU here and for CUDA in csrc/cuda/masked_conv_cuda.cu; only the row
// gather/scatter kernels are device specific. It is an explicit op with its own backward op (autograd in
// gmd_ext/ds_ops.py) rather than CompositeImplicitAutograd because the pair count P is data dependent: as one
// opaque op its output shape [B, M, Cout, *S'] is static, so torch.compile(fullgraph=True) needs no
// data-dependent shapes and autograd never sees the packed [P, ...] intermediates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace gmd_ext {

namespace {

// Below ~32 KiB per task the thread hand-off costs more than the copy (at::parallel_for's own heuristic size).
constexpr int64_t kGrainBytes = 32768;

void check_index(const at::Tensor& index, const at::Tensor& t, const char* tname) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "index must be a 1-D int64 tensor, got ", index.dim(), "-D ", index.scalar_type());
  TORCH_CHECK(index.device() == t.device(), "index must be on ", tname, "'s device ", t.device(), ", got ",
              index.device());
}

// inverse[r] = i where index[i] == r, -1 for rows not in index; rejects out-of-range and repeated rows (the ops
// are each other's adjoint only for distinct indices).
std::vector<int64_t> inverse_map(const at::Tensor& index, int64_t num_rows) {
  std::vector<int64_t> inverse(num_rows, -1);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    const int64_t r = idx[i];
    TORCH_CHECK(r >= 0 && r < num_rows, "index[", i, "] = ", r, " is out of range [0, ", num_rows, ")");
    TORCH_CHECK(inverse[r] < 0, "index must hold distinct rows; row ", r, " appears twice");
    inverse[r] = i;
  }
  return inverse;
}

}  // namespace

at::Tensor pack_pairs_cpu(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK(x.dim() >= 1, "pack_pairs: x must have a leading row dim, got a 0-D tensor");
  check_index(index, x, "x");
  const auto xc = x.contiguous();
  const auto ic = index.contiguous();
  inverse_map(ic, x.size(0));  // validation only
  auto sizes = x.sizes().vec();
  sizes[0] = ic.numel();
  auto out = at::empty(sizes, x.options());
  const int64_t row_bytes = x.size(0) ? x.nbytes() / x.size(0) : 0;
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  // Split the packed bytes evenly, whatever the row size: one 2 MiB row (32^3 x 16 fp32) uses every thread.
  at::parallel_for(0, ic.numel() * row_bytes, kGrainBytes, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / row_bytes, off = begin % row_bytes;
      const int64_t n = std::min(end - begin, row_bytes - off);
      std::memcpy(dst + begin, src + idx[row] * row_bytes + off, n);
      begin += n;
    }
  });
  return out;
}

at::Tensor scatter_pairs_cpu(const at::Tensor& y, const at::Tensor& index, int64_t num_pairs) {
  TORCH_CHECK(y.dim() >= 1, "scatter_pairs: y must have a leading row dim, got a 0-D tensor");
  check_index(index, y, "y");
  TORCH_CHECK(index.numel() == y.size(0), "scatter_pairs: index has ", index.numel(), " entries but y has ",
              y.size(0), " rows");
  TORCH_CHECK(num_pairs >= 0, "scatter_pairs: num_pairs must be >= 0, got ", num_pairs);
  const auto yc = y.contiguous();
  const auto inverse = inverse_map(index.contiguous(), num_pairs);
  auto sizes = y.sizes().vec();
  sizes[0] = num_pairs;
  auto out = at::empty(sizes, y.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = out.nbytes() / num_pairs;
  const char* src = static_cast<const char*>(yc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  // One pass writes every output byte once: a copy for present rows, zeros (the mask) for the others.
  at::parallel_for(0, num_pairs * row_bytes, kGrainBytes, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / row_bytes, off = begin % row_bytes;
      const int64_t n = std::min(end - begin, row_bytes - off);
      const int64_t from = inverse[row];
      if (from >= 0) {
        std::memcpy(dst + begin, src + from * row_bytes + off, n);
      } else {
        std::memset(dst + begin, 0, n);
      }
      begin += n;
    }
  });
  return out;
}

// ---------------------------------------------------------------- device-independent composition
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

struct Pairs {
  at::Tensor index;             // [P] int64 flat b * M + m, modality-major
  std::vector<int64_t> counts;  // present pairs per modality (filled only when the weight or bias is per modality)
};

// Modality-major order keeps each modality's pairs contiguous in the packed tensor, so a per-modality weight
// runs one convolution per modality on a narrow() of it, with no extra copy.
Pairs present_pairs(const at::Tensor& present, bool need_counts) {
  const int64_t M = present.size(1);
  auto mb = at::nonzero(present.t());  // [P, 2] rows (m, b), sorted m-major
  Pairs p;
  p.index = (mb.select(1, 1) * M + mb.select(1, 0)).contiguous();
  if (need_counts) {
    auto c = present.sum(0, /*keepdim=*/false, at::kLong).cpu();
    p.counts.assign(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + M);
  }
  return p;
}

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& present, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation) {
  const int64_t nsp = x.dim() - 3;
  TORCH_CHECK(nsp >= 1 && nsp <= 3, "masked_conv: x must be [B, M, Cin, *S] with 1-3 spatial dims, got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == nsp + 2 || (weight.dim() == nsp + 3 && weight.size(0) == x.size(1)),
              "masked_conv: weight must be [Cout, Cin, *k] or [M, Cout, Cin, *k], got ", weight.sizes(),
              " for x ", x.sizes());
  TORCH_CHECK(present.scalar_type() == at::kBool && present.dim() == 2 && present.size(0) == x.size(0) &&
                  present.size(1) == x.size(1),
              "masked_conv: present must be bool [B, M] = [", x.size(0), ", ", x.size(1), "], got ",
              present.scalar_type(), " ", present.sizes());
  TORCH_CHECK(present.device() == x.device(), "masked_conv: present must be on x's device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 || (bias->dim() == 2 && bias->size(0) == x.size(1)),
                "masked_conv: bias must be [Cout] or [M, Cout], got ", bias->sizes());
  }
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == nsp && static_cast<int64_t>(padding.size()) == nsp &&
                  static_cast<int64_t>(dilation.size()) == nsp,
              "masked_conv: stride, padding and dilation need one entry per spatial dim (", nsp, ")");
}

}  // namespace

at::Tensor masked_conv_composite(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& present, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  check_conv_args(x, weight, bias, present, stride, padding, dilation);
  const int64_t nsp = x.dim() - 3, B = x.size(0), M = x.size(1);
  const bool per_weight = weight.dim() == nsp + 3;
  const bool per_bias = bias.has_value() && bias->dim() == 2;
  const std::vector<int64_t> no_output_padding(nsp, 0);
  const auto pairs = present_pairs(present, per_weight || per_bias);
  auto xs = x.sizes().vec();
  xs.erase(xs.begin());
  xs[0] = B * M;
  const auto xp = call_pack(x.reshape(xs), pairs.index);
  const auto conv = [&](const at::Tensor& in, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return at::convolution(in, w, b, stride, padding, dilation, false, no_output_padding, 1);
  };
  at::Tensor yp;
  if (!per_weight && !per_bias) {
    yp = conv(xp, weight, bias);
  } else {
    // One convolution per modality on its contiguous slice of the packed pairs (a narrow(), no copy).
    std::vector<at::Tensor> pieces;
    int64_t start = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = pairs.counts[m];
      if (n == 0) continue;
      const auto w = per_weight ? weight.select(0, m) : weight;
      const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(
                                                                 per_bias ? bias->select(0, m) : *bias)
                                                           : std::nullopt;
      pieces.push_back(conv(xp.narrow(0, start, n), w, b));
      start += n;
    }
    if (pieces.empty()) {
      // No pair present anywhere: run the convolution on an empty batch only to get the output shape.
      yp = conv(xp, per_weight ? weight.select(0, 0) : weight, std::nullopt);
    } else {
      yp = pieces.size() == 1 ? pieces[0] : at::cat(pieces);
    }
  }
  auto y = call_scatter(yp, pairs.index, B * M);
  auto ys = yp.sizes().vec();
  ys[0] = M;
  ys.insert(ys.begin(), B);
  return y.view(ys);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv_backward_composite(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& present, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 3> output_mask) {
  check_conv_args(x, weight, bias, present, stride, padding, dilation);
  const int64_t nsp = x.dim() - 3, B = x.size(0), M = x.size(1);
  const bool per_weight = weight.dim() == nsp + 3;
  const bool per_bias = bias.has_value() && bias->dim() == 2;
  const bool need_bias = output_mask[2] && bias.has_value();
  const std::vector<int64_t> no_output_padding(nsp, 0);
  const auto pairs = present_pairs(present, per_weight || per_bias);
  auto flat = [&](const at::Tensor& t) {
    auto s = t.sizes().vec();
    s.erase(s.begin());
    s[0] = B * M;
    return t.reshape(s);
  };
  const auto xp = call_pack(flat(x), pairs.index);
  const auto gp = call_pack(flat(grad_y), pairs.index);
  const int64_t Cout = per_weight ? weight.size(1) : weight.size(0);
  const std::vector<int64_t> bias_sizes{Cout};

  const auto conv_backward = [&](int64_t start, int64_t n, const at::Tensor& w) {
    return at::convolution_backward(
        gp.narrow(0, start, n), xp.narrow(0, start, n), w,
        need_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride, padding, dilation,
        false, no_output_padding, 1, {output_mask[0], output_mask[1], need_bias});
  };
  at::Tensor dxp, dw, db;
  if (!per_weight && !per_bias && xp.size(0) > 0) {
    std::tie(dxp, dw, db) = conv_backward(0, xp.size(0), weight);
  } else {
    // Per-modality groups (or nothing present): accumulate into zeros, so a modality without pairs gets zeros.
    dxp = output_mask[0] ? at::zeros_like(xp) : at::Tensor();
    dw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::Tensor();
    db = need_bias ? at::zeros(bias->sizes(), bias->options()) : at::Tensor();
  }
  if (per_weight || per_bias) {
    int64_t start = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = pairs.counts[m];
      if (n > 0) {
        auto [gx, gw, gb] = conv_backward(start, n, per_weight ? weight.select(0, m) : weight);
        if (output_mask[0]) dxp.narrow(0, start, n).copy_(gx);
        if (output_mask[1]) (per_weight ? dw.select(0, m) : dw).add_(gw);
        if (need_bias) (per_bias ? db.select(0, m) : db).add_(gb);
      }
      start += n;
    }
  }
  at::Tensor dx;
  if (output_mask[0]) dx = call_scatter(dxp, pairs.index, B * M).view(x.sizes());
  // Contiguous like the fake kernel says (the vendor backward may pick another weight layout).
  return {dx, dw.defined() ? dw.contiguous() : dw, db};
}

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) {
  m.impl("pack_pairs", &gmd_ext::pack_pairs_cpu);
  m.impl("scatter_pairs", &gmd_ext::scatter_pairs_cpu);
  m.impl("masked_conv", &gmd_ext::masked_conv_composite);
  m.impl("masked_conv_backward", &gmd_ext::masked_conv_backward_composite);
}
