// pack_pairs / scatter_pairs on CPU: the row gather and the fused scatter + zero-fill around the vendor
// convolution of masked_conv (csrc/masked_conv.cpp composes them, device-independently).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ds_common.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace gmd_ext {

namespace {

// Below ~32 KiB per task the thread hand-off costs more than the copy (at::parallel_for's own heuristic size).
constexpr int64_t kGrainBytes = 32768;

// inverse[r] = i where index[i] == r, -1 for rows not in index; entries -1 of index (empty slots) are skipped.
// Rejects out-of-range and repeated rows: the two ops are each other's adjoint only for distinct indices.
std::vector<int64_t> inverse_map(const at::Tensor& index, int64_t num_rows) {
  std::vector<int64_t> inverse(num_rows, -1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    const int64_t r = idx[i];
    if (r == -1) continue;
    TORCH_CHECK(r >= 0 && r < num_rows, "index[", i, "] = ", r, " is out of range [-1, ", num_rows, ")");
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
      if (idx[row] >= 0) {
        std::memcpy(dst + begin, src + idx[row] * row_bytes + off, n);
      } else {
        std::memset(dst + begin, 0, n);  // an empty slot of the grouped layout
      }
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

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CPU, m) {
  m.impl("pack_pairs", &gmd_ext::pack_pairs_cpu);
  m.impl("scatter_pairs", &gmd_ext::scatter_pairs_cpu);
}
