// Every gmd_ext op schema lives here, in one TORCH_LIBRARY block. Kernels register per dispatch key at the end
// of their own files (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu); the Python front end is gmd_ext/ops.py.
// The CMake build (libtorch users, no Python) defines GMD_EXT_NO_PYTHON and drops the module stub.
#ifndef GMD_EXT_NO_PYTHON
#include <Python.h>

extern "C" {
// Importing gmd_ext._C loads this .so, which runs the registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

#include <torch/library.h>

TORCH_LIBRARY(gmd_ext, m) {
  // ---- GMD projection (docs/design.md) ----
  // G [K, N] fp32/fp16/bf16 -> Gamma = G G^T [K, K] fp32 (fp64 accumulation across blocks).
  m.def("gram(Tensor G) -> Tensor");
  // gram [K, K] fp32, perms [K, K] int64 (row i: the order g_i is projected against the original g_j)
  // -> A [K, K] fp32 with projected g_i' = sum_k A[i, k] g_k. Zero-norm objectives are skipped.
  m.def("pcgrad_coefficients(Tensor gram, Tensor perms) -> Tensor");
  // out[n] = scale(n) * sum_k c[k] G[k, n], scale = shared_scale where shared[n] (or shared is None),
  // other_scale elsewhere. G [K, N], c [K] fp32, shared [N] bool -> [N] in G's dtype (fp32 accumulation).
  m.def("combine(Tensor G, Tensor c, Tensor? shared, float shared_scale, float other_scale) -> Tensor");
  // A [R, K] fp32, G [K, N] -> A @ G [R, N] in G's dtype (fp32 accumulation); reduction='none' and grad of gram.
  m.def("combine_rows(Tensor G, Tensor A) -> Tensor");

  // ---- Dynamic Sharing (docs/design.md) ----
  // Row gather / scatter around the vendor convolution; each is the other's adjoint (rows in index are distinct;
  // an entry -1 is an empty slot: a zero row in pack_pairs, a dropped row in scatter_pairs).
  // x [N, *F], index [P] int64 -> x[index] [P, *F].
  m.def("pack_pairs(Tensor x, Tensor index) -> Tensor");
  // y [P, *F], index [P] int64 -> out [num_pairs, *F] with out[index[i]] = y[i] and zeros in the other rows.
  m.def("scatter_pairs(Tensor y, Tensor index, int num_pairs) -> Tensor");
  // x [B, M, Cin, *S], weight [Cout, Cin, *k] or [M, Cout, Cin, *k], bias None | [Cout] | [M, Cout], and the pair
  // plan of present: index [P] int64 on x's device (flat b * M + m of the present pairs, modality-major) and
  // counts [M] (host ints, the pairs per modality, summing to P) -> y [B, M, Cout, *S'], zeros at absent pairs.
  // pack -> at::convolution -> scatter; the plan is built once on the host (gmd_ext.ops.ds_ops.PairPlan), so the
  // op never synchronises, and its output shape does not depend on the plan (torch.compile traces it whole).
  m.def("masked_conv(Tensor x, Tensor weight, Tensor? bias, Tensor index, int[] counts, int[] stride, "
        "int[] padding, int[] dilation) -> Tensor");
  // -> (grad_x, grad_weight, grad_bias); an entry is None where output_mask is False (grad_bias also where bias
  // is None). grad_y is [B, M, Cout, *S'] in x's dtype. Only present pairs contribute.
  m.def("masked_conv_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor index, int[] counts, "
        "int[] stride, int[] padding, int[] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // x [B, M, C, *S], weight/bias [M, C], present [B, M] bool, activation "none" | "relu" | "leaky_relu" (0.01)
  // -> (y [B, M, C, *S] in x's dtype, mean [B, M, G], rstd [B, M, G] in fp32 (fp64 for fp64 x)); zeros at absent.
  m.def("modality_group_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor present, int num_groups, float eps, "
        "str activation) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias), None where output_mask is False; absent pairs get and give nothing.
  m.def("modality_group_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor present, "
        "Tensor mean, Tensor rstd, int num_groups, str activation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}
