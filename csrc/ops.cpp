// Every gmd_ext op schema lives here, in one TORCH_LIBRARY block. Kernels register per dispatch key at the end
// of their own files (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu); the Python front end is gmd_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing gmd_ext._C loads this .so, which runs the registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gmd_ext, m) {
  // ---- GMD projection (DESIGN §1, §3) ----
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

  // ---- Dynamic Sharing (DESIGN §3) ----
}
