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
std::vector<int64_t> inverse_map(const char* op, const at::Tensor& index, int64_t num_rows) {
  std::vector<int64_t> inverse(num_rows, -1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    const int64_t r = idx[i];
    if (r == -1) continue;
    TORCH_CHECK_VALUE(r >= 0 && r < num_rows, op, ": index[", i, "] = ", r, " is out of range [-1, ", num_rows,
                      ")");
    TORCH_CHECK_VALUE(inverse[r] < 0, op, ": index must hold distinct rows; row ", r, " appears at entries ",
                      inverse[r], " and ", i);
    inverse[r] = i;
  }
  return inverse;
}

}  // namespace

at::Tensor pack_pairs_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_pack_args(x, index);
  const auto xc = x.contiguous();
  const auto ic = index.contiguous();
  inverse_map("pack_pairs", ic, x.size(0));  // validation only
  auto sizes = x.sizes().vec();
  sizes[0] = ic.numel();
  auto out = at::empty(sizes, x.options());
  // From the row shape, not x.nbytes() / N: with N == 0 every entry is -1 and the output is all zero rows.
  const int64_t row_bytes = gmd_ext::row_bytes(x);
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
  check_scatter_args(y, index, num_pairs);
  const auto yc = y.contiguous();
  const auto inverse = inverse_map("scatter_pairs", index.contiguous(), num_pairs);
  auto sizes = y.sizes().vec();
  sizes[0] = num_pairs;
  auto out = at::empty(sizes, y.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = gmd_ext::row_bytes(out);
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
