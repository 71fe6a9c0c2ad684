#!/usr/bin/env bash
# Run a command as an AVX2 + FMA CPU would (issue 3's machine class) on a machine with AVX-512/AMX: sparsekit's
# kernels and torch's dense paths (ATen, MKL GEMM, oneDNN conv) all lowered to AVX2, so neither side of a
# comparison keeps the wider instructions. Result files record these variables (meta.env) and their kernel ISA
# (meta.cpu_kernel_isa = avx2); bench/targets.py reads them into the README's "AVX2 class" table.
#
#   bash bench/avx2_class.sh sparsekit bench kernels --ops linear --shapes bert-base.mlp_up,bert-base.mlp_down ...
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: bash bench/avx2_class.sh COMMAND [ARGS...]" >&2
    exit 2
fi
export SPARSEKIT_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
exec "$@"
