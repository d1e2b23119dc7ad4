// pack_pairs / scatter_pairs on CUDA: the row gather and the fused scatter + mask kernels around the vendor
// convolution of masked_conv (csrc/masked_conv.cpp composes them, device-independently).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ds_common.h"
#include "common.cuh"

#include <array>
#include <optional>

namespace gmd_ext {

namespace {

using cuda::kThreads;

// Rows are copied in the widest unit that divides the row size and the pointers' alignment (16 bytes for
// fp32 rows of a multiple of 4 elements): a memory-bound copy wants 128-bit accesses.
template <typename Unit>
__global__ void gather_rows_kernel(const Unit* __restrict__ src, const int64_t* __restrict__ index,
                                   Unit* __restrict__ dst, int64_t num_rows_src, int64_t rows, int64_t row_units) {
  const int64_t total = rows * row_units;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / row_units, j = k - i * row_units;
    const int64_t r = index[i];
    // -1 is an empty slot of the grouped layout. Index values are validated where the plan is built, on the host
    // (csrc/ds_common.h check_index); an out-of-range entry is read as an empty slot rather than trapping, so a
    // bad index can never poison the CUDA context with a device-side assert.
    dst[k] = r >= 0 && r < num_rows_src ? src[r * row_units + j] : Unit{};
  }
}

// inverse[index[i]] = i + 1 for the in-range entries (0: a row not in index; -1 entries are empty slots). Distinct rows are validated on the host where
// the plan is built (a check here would cost a host sync); atomicMax makes a repeated row deterministic (the last
// entry wins) instead of a race, and out-of-range entries are skipped, never written.
__global__ void inverse_kernel(const int64_t* __restrict__ index, int64_t* __restrict__ inverse, int64_t n,
                               int64_t num_rows) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index[i];
    if (r >= 0 && r < num_rows) {
      atomicMax(reinterpret_cast<unsigned long long*>(inverse + r), static_cast<unsigned long long>(i) + 1ull);
    }
  }
}

// out[r] = src[inverse[r] - 1] where inverse[r] > 0, zeros elsewhere: every output byte written once.
template <typename Unit>
__global__ void scatter_rows_kernel(const Unit* __restrict__ src, const int64_t* __restrict__ inverse,
                                    Unit* __restrict__ dst, int64_t rows, int64_t row_units) {
  const int64_t total = rows * row_units;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = k / row_units, j = k - r * row_units;
    const int64_t from = inverse[r] - 1;  // inverse holds entry + 1, 0 for rows not in index
    dst[k] = from >= 0 ? src[from * row_units + j] : Unit{};
  }
}

int64_t unit_bytes(int64_t row_bytes, const void* a, const void* b) {
  const auto addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int64_t u : {16, 8, 4, 2}) {
    if (row_bytes % u == 0 && addr % u == 0) return u;
  }
  return 1;
}

template <typename Launch>
void dispatch_unit(int64_t unit, Launch&& launch) {
  switch (unit) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{}); break;
  }
}

int blocks_for(int64_t total) {
  // Grid-stride loops: enough blocks to fill the GPU several times over, capped to keep launch cheap.
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

}  // namespace

at::Tensor pack_pairs_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_pack_args(x, index);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto ic = index.contiguous();
  auto sizes = x.sizes().vec();
  sizes[0] = ic.numel();
  auto out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  // From the row shape, not x.nbytes() / N: with N == 0 every entry is an empty slot and the output all zeros.
  const int64_t row_bytes = gmd_ext::row_bytes(x);
  const int64_t unit = unit_bytes(row_bytes, xc.const_data_ptr(), out.const_data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_unit(unit, [&](auto tag) {
    using Unit = decltype(tag);
    const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(Unit));
    gather_rows_kernel<Unit><<<blocks_for(ic.numel() * row_units), kThreads, 0, stream>>>(
        static_cast<const Unit*>(xc.const_data_ptr()), ic.const_data_ptr<int64_t>(),
        static_cast<Unit*>(out.mutable_data_ptr()), x.size(0), ic.numel(), row_units);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_pairs_cuda(const at::Tensor& y, const at::Tensor& index, int64_t num_pairs) {
  check_scatter_args(y, index, num_pairs);
  const c10::cuda::CUDAGuard guard(y.device());
  const auto yc = y.contiguous();
  const auto ic = index.contiguous();
  auto inverse = at::zeros({num_pairs}, index.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (ic.numel() > 0) {
    inverse_kernel<<<blocks_for(ic.numel()), kThreads, 0, stream>>>(ic.const_data_ptr<int64_t>(),
                                                                     inverse.mutable_data_ptr<int64_t>(), ic.numel(),
                                                                     num_pairs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sizes = y.sizes().vec();
  sizes[0] = num_pairs;
  auto out = at::empty(sizes, y.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = gmd_ext::row_bytes(out);
  const int64_t unit = unit_bytes(row_bytes, yc.const_data_ptr(), out.const_data_ptr());
  dispatch_unit(unit, [&](auto tag) {
    using Unit = decltype(tag);
    const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(Unit));
    scatter_rows_kernel<Unit><<<blocks_for(num_pairs * row_units), kThreads, 0, stream>>>(
        static_cast<const Unit*>(yc.const_data_ptr()), inverse.const_data_ptr<int64_t>(),
        static_cast<Unit*>(out.mutable_data_ptr()), num_pairs, row_units);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gmd_ext

TORCH_LIBRARY_IMPL(gmd_ext, CUDA, m) {
  m.impl("pack_pairs", &gmd_ext::pack_pairs_cuda);
  m.impl("scatter_pairs", &gmd_ext::scatter_pairs_cuda);
}
