// Argument checks and dtype dispatch shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the GMD
// projection ops, so both devices reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace gmd_ext {

inline bool is_projection_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// device: the kernel's device type; device_name: "CPU" or "CUDA", for the message.
inline void check_G(const char* op, const at::Tensor& G, c10::DeviceType device, const char* device_name) {
  TORCH_CHECK_VALUE(G.dim() == 2, op, ": G must be a 2-D [K, N] tensor, got a ", G.dim(), "-D tensor of shape ",
              G.sizes());
  TORCH_CHECK_TYPE(is_projection_dtype(G.scalar_type()), op, ": G must be float32, float16 or bfloat16, got ",
              G.scalar_type());
  TORCH_CHECK_VALUE(G.device().type() == device, op, ": G must be a ", device_name, " tensor for the ", device_name,
              " kernel, got ", G.device());
}

// Calls fn(T{}) with T the C++ type of a projection dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    default: return fn(c10::BFloat16{});
  }
}

// combine(G [K, N], c [K] fp32, shared [N] bool | None), after check_G.
inline void check_combine_args(const char* op, const at::Tensor& G, const at::Tensor& c,
                               const std::optional<at::Tensor>& shared) {
  const int64_t K = G.size(0), N = G.size(1);
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == K, op, ": c must be a 1-D tensor of length K = ", K,
              " (one coefficient per row of G), got shape ", c.sizes());
  TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, op, ": c must be float32, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.device() == G.device(), op, ": c must be on G's device ", G.device(), ", got ", c.device());
  if (shared.has_value()) {
    TORCH_CHECK_VALUE(shared->dim() == 1 && shared->size(0) == N, op, ": shared must be a 1-D tensor of length N = ", N,
                " (one flag per column of G), got shape ", shared->sizes());
    TORCH_CHECK_TYPE(shared->scalar_type() == at::kBool, op, ": shared must be a bool tensor, got ",
                shared->scalar_type());
    TORCH_CHECK_VALUE(shared->device() == G.device(), op, ": shared must be on G's device ", G.device(), ", got ",
                shared->device());
  }
}

// combine_rows(G [K, N], A [R, K] fp32), after check_G.
inline void check_combine_rows_args(const char* op, const at::Tensor& G, const at::Tensor& A) {
  const int64_t K = G.size(0);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == K, op, ": A must be a 2-D [R, K] tensor with K = ", K,
              " (G's number of rows), got shape ", A.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat, op, ": A must be float32, got ", A.scalar_type());
  TORCH_CHECK_VALUE(A.device() == G.device(), op, ": A must be on G's device ", G.device(), ", got ", A.device());
}

// pcgrad_coefficients(gram [K, K] float32, perms [K, K] int64); returns K. The range of perms' entries is checked
// by the CPU kernel (it reads them on the host); the CUDA kernel must not sync with the host to check them.
inline int64_t check_pcgrad_args(const char* op, const at::Tensor& gram, const at::Tensor& perms,
                                 c10::DeviceType device, const char* device_name) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), op,
                    ": gram must be a square 2-D [K, K] tensor, got shape ", gram.sizes());
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kFloat, op, ": gram must be float32, got ", gram.scalar_type());
  TORCH_CHECK_VALUE(gram.device().type() == device, op, ": gram must be a ", device_name, " tensor for the ",
                    device_name, " kernel, got ", gram.device());
  const int64_t K = gram.size(0);
  TORCH_CHECK_VALUE(perms.dim() == 2 && perms.size(0) == K && perms.size(1) == K, op,
                    ": perms must be a [K, K] tensor with K = ", K, " (gram's size), got shape ", perms.sizes());
  TORCH_CHECK_TYPE(perms.scalar_type() == at::kLong, op, ": perms must be int64, got ", perms.scalar_type());
  TORCH_CHECK_VALUE(perms.device() == gram.device(), op, ": perms must be on gram's device ", gram.device(),
                    ", got ", perms.device());
  return K;
}

}  // namespace gmd_ext
