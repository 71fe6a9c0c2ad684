// The one TORCH_LIBRARY(sparsekit, m): every C++ op schema lives here.
//
// Conventions shared by all ops (W is the sparse weight of logical shape [N, K]):
//   *_mm     y  = x @ W^T (+ bias)        x [M, K]  -> y  [M, N]
//   *_mm_t   dx = dy @ W                  dy [M, N] -> dx [M, K]   (backward w.r.t. x)
//   *_sddmm  dW = (dy^T @ x) restricted to W's pattern, returned in W's values layout
// Index tensors are plain contiguous tensors (never views of torch sparse tensors).
//   BSR: crow_indices int32 [N/bn + 1], col_indices int32 [nnzb] (block columns), values [nnzb, bn, bk]
//   CSR: crow_indices int32 [N + 1],    col_indices int16|int32 [nnz],               values [nnz]
//   NM:  values [N, K/m*n], indices uint8 [N, K/m*n] (position 0..m-1 inside each group of m)
// The Python layer (sparsekit/ops) registers fakes, autograd and a pure-PyTorch reference for each.
#include <Python.h>
#include <torch/library.h>

// Importing sparsekit._C runs the static registrations below; the module itself has no functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(sparsekit, m) {
  m.def("bsr_mm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor");
  m.def("bsr_mm_t(Tensor dy, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt k) -> Tensor");
  m.def("bsr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, SymInt block_n, SymInt block_k) -> Tensor");

  m.def("csr_mm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor");
  m.def("csr_mm_t(Tensor dy, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt k) -> Tensor");
  m.def("csr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor");

  m.def("nm_mm(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m) -> Tensor");
  m.def("nm_mm_t(Tensor dy, Tensor values, Tensor indices, int n, int m) -> Tensor");
  m.def("nm_sddmm(Tensor dy, Tensor x, Tensor indices, int n, int m) -> Tensor");
}
