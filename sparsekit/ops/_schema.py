"""Op schemas, mirrored from csrc/ops.cpp so that a pure-Python install defines the same ops.

tests/test_ops.py checks the two stay identical (from the sources, and the registered ops when the extension is
built); ``cpu_kernel_isa``, which only reports the C++ kernels' instruction set, is not mirrored.
"""

SCHEMAS: dict[str, str] = {
    "bsr_mm": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor",
    "bsr_mm_t": "(Tensor dy, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt k) -> Tensor",
    "bsr_mm_xt": "(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) "
                 "-> Tensor",
    "bsr_mm_xt_tiled": "(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                       "SymInt n, SymInt[] sizes, int[] kernel) -> Tensor",
    "bsr_conv2d": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                  "int[2] kernel_size, int[2] padding, int[2] dilation, int[2] stride=1) -> Tensor",
    "bsr_conv3d": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                  "int[3] kernel_size, int[3] padding, int[3] dilation, int[3] stride=1) -> Tensor",
    "bsr_sddmm": "(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices, SymInt block_n, SymInt block_k) "
                 "-> Tensor",
    "csr_mm": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) -> Tensor",
    "csr_mm_t": "(Tensor dy, Tensor crow_indices, Tensor col_indices, Tensor values, SymInt k) -> Tensor",
    "csr_mm_xt": "(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n) "
                 "-> Tensor",
    "csr_mm_xt_tiled": "(Tensor xt, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                       "SymInt n, SymInt[] sizes, int[] kernel) -> Tensor",
    "csr_conv2d": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                  "int[2] kernel_size, int[2] padding, int[2] dilation, int[2] stride=1) -> Tensor",
    "csr_conv3d": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
                  "int[3] kernel_size, int[3] padding, int[3] dilation, int[3] stride=1) -> Tensor",
    "csr_sddmm": "(Tensor dy, Tensor x, Tensor crow_indices, Tensor col_indices) -> Tensor",
    "csr_bitmap_mm": "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor bitmap, Tensor values, Tensor? bias, "
                     "SymInt n) -> Tensor",
    "nm_mm": "(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m) -> Tensor",
    "nm_mm_t": "(Tensor dy, Tensor values, Tensor indices, int n, int m) -> Tensor",
    "nm_sddmm": "(Tensor dy, Tensor x, Tensor indices, int n, int m) -> Tensor",
    "rnn_cell": "(Tensor gi, Tensor gh, Tensor h, Tensor? c, int mode) -> (Tensor, Tensor)",
    "channel_gather_conv2d": "(Tensor x, Tensor in_idx, Tensor weight, Tensor? bias, Tensor? out_idx, int? n_out, "
                             "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor",
}
