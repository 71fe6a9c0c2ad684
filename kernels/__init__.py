"""Triton kernels (installed as ``sparsekit.kernels``).

Importing this package is cheap and never imports triton: sparsekit must import without triton
installed. Import a kernel module explicitly when you need it (that imports triton):

    k_bsr_mm        BSR x dense, y = x @ W^T (+ bias):
                    ``bsr_mm(x, crow_indices, col_indices, values, bias, n)``
    _configs        launch-config tables (BLOCK_M / num_warps / num_stages): hand-written, replaced per row by a
                    measured JSON table (tuned_sm<major>0.json here or $SPARSEKIT_TRITON_CONFIGS, written by
                    bench/tune_triton.py); the candidate configs tuning times; imports torch only
    _autotune       SPARSEKIT_TRITON_AUTOTUNE=1: time the candidates on the first launch of a key (opt-in)
    _tiles          @triton.jit tile-indexing helpers the kernels share (grouped program order, row tiles)
    _launch         argument checks, default dot precision and device context the launchers share; torch only
    _compile_check  ``check_all()``: compile every kernel for sm80/sm90 without a GPU
"""
