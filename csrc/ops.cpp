// The one TORCH_LIBRARY(sparsekit, m): every public C++ op schema lives here (mirrored in sparsekit/ops/_schema.py).
// A CUDA-only helper op without a Python face may be defined next to its kernel with TORCH_LIBRARY_FRAGMENT
// (csr_mm_variant in cuda/csr_spmm.cu, which the dispatcher uses to time the CUDA CSR kernels one by one).
//
// Conventions shared by all ops (W is the sparse weight of logical shape [N, K]):
//   *_mm     y  = x @ W^T (+ bias)        x [M, K]  -> y  [M, N]
//   *_mm_t   dx = dy @ W                  dy [M, N] -> dx [M, K]   (backward w.r.t. x)
//   *_mm_xt  y^T = W @ x^T (+ bias[:, None]) xt [B, K, M] -> yt [B, N, M]  (convolutions: per image, im2col
//            patches / NCHW pixels are already x^T; autograd goes through *_mm_t and *_sddmm)
//   *_mm_xt_tiled  *_mm_xt for a transposed conv whose kernel equals its stride (no padding): rows (c, *tap) of
//            y^T, columns (*pixel) of x, written straight into y [B, n / prod(kernel), *(sizes * kernel)] at
//            y[b, c, *(pixel * kernel + tap)] (sizes: x's spatial dims, prod(sizes) = M; the taps tile the output)
//   *_conv2d y = conv2d(x [B, C, H, W], W over [N, C*kh*kw], any stride, groups 1) (+ bias) -> [B, N, Ho, Wo]
//   *_conv3d the same in 3-D: x [B, C, D, H, W], W over [N, C*kd*kh*kw] -> [B, N, Do, Ho, Wo]
//            (autograd through F.unfold/F.fold and *_mm_t / *_sddmm)
//   *_sddmm  dW = (dy^T @ x) restricted to W's pattern, returned in W's values layout
//   csr_bitmap_mm  csr_mm for a CSR that carries a bitmap of its pattern (uint8 [N, 8 * ceil(K / 64)], bit k of
//            row r set iff W[r, k] is stored): for few rows of x the CPU kernel expands each row's values by the
//            bitmap instead of gathering x by col_indices (more rows: csr_mm); autograd as csr_mm's
//   channel_gather_conv2d  y = conv2d(x[:, in_idx], weight [C_out, len(in_idx)/groups, kh, kw], bias, stride,
//            padding, dilation, groups) for a layer whose input channels were compacted to in_idx (int32|int64)
//            while x keeps them all; with out_idx (int32|int64 [C_out]) and n_out: a zero [B, n_out, Ho, Wo]
//            tensor whose channels out_idx hold the result (out_idx and n_out are given together or not at all).
//            y is channels_last when x is (channels_last-contiguous, not NCHW-contiguous), else contiguous.
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
  m.def("bsr_mm_xt(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor");
  m.def("bsr_mm_xt_tiled(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n, SymInt[] sizes, int[] kernel) -> Tensor");
  m.def("bsr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int[2] kernel_size, int[2] padding, int[2] dilation, int[2] stride=1) -> Tensor");
  m.def("bsr_conv3d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int[3] kernel_size, int[3] padding, int[3] dilation, int[3] stride=1) -> Tensor");
  m.def("bsr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, SymInt block_n, SymInt block_k) -> Tensor");

  m.def("csr_mm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor");
  m.def("csr_mm_t(Tensor dy, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt k) -> Tensor");
  m.def("csr_mm_xt(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor");
  m.def("csr_mm_xt_tiled(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n, SymInt[] sizes, int[] kernel) -> Tensor");
  m.def("csr_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int[2] kernel_size, int[2] padding, int[2] dilation, int[2] stride=1) -> Tensor");
  m.def("csr_conv3d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int[3] kernel_size, int[3] padding, int[3] dilation, int[3] stride=1) -> Tensor");
  m.def("csr_sddmm(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor");
  m.def("csr_bitmap_mm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor bitmap, Tensor values, Tensor? bias, SymInt n) -> Tensor");

  m.def("nm_mm(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m) -> Tensor");
  m.def("nm_mm_t(Tensor dy, Tensor values, Tensor indices, int n, int m) -> Tensor");
  m.def("nm_sddmm(Tensor dy, Tensor x, Tensor indices, int n, int m) -> Tensor");

  // The CPU kernels' instruction set as chosen now: "avx512", "avx2" or "scalar", with "+amx" when bf16 BSR
  // products run on AMX tiles (both honour SPARSEKIT_CPU_ISA, read per call).
  m.def("cpu_kernel_isa() -> str");

  // The pointwise part of one recurrent step (LinearRecurrent): mode 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU.
  m.def("rnn_cell(Tensor gi, Tensor gh, Tensor h, Tensor? c, int mode) -> (Tensor, Tensor)");

  m.def("channel_gather_conv2d(Tensor x, Tensor in_idx, Tensor weight, Tensor? bias, Tensor? out_idx, int? n_out, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
}
