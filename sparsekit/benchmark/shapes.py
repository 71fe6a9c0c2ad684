"""Real model shapes for the kernel benchmarks.

Linear shapes are weights [N, K] = [out_features, in_features] applied to M rows (tokens); conv shapes are
ResNet-50 / MobileNetV2 convolutions at 224x224 input. ``m`` / ``batch`` have a CPU and a CUDA default (a
2-core CPU cannot sweep LLaMA-sized GEMMs at GPU batch sizes in reasonable time); ``--m`` / ``--batch``
override them. A linear shape's ``default_devices`` says on which devices the default sweep (no ``--shapes``)
includes it: the square 4096 GEMM and the OPT-30B linears are GPU-only by default (too large, or a duplicate of
llama-7b.attn_proj, for a 2-core CPU), but run anywhere when named. The table lives in the installed package
so ``sparsekit bench`` can use it; ``bench/shapes.py`` re-exports it and prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinearShape", "ConvShape", "LINEAR_SHAPES", "CONV_SHAPES", "QUICK_LINEAR", "QUICK_CONV",
           "get_shapes", "shape_names"]


@dataclass(frozen=True)
class LinearShape:
    """y[M, N] = x[M, K] @ W[N, K]^T."""

    name: str
    n: int            # out_features
    k: int            # in_features
    m_cpu: int        # rows (tokens) on CPU
    m_cuda: int       # rows (tokens) on CUDA
    source: str       # where the shape comes from
    default_devices: tuple[str, ...] = ("cpu", "cuda")   # devices whose default sweep includes it

    op = "linear"

    def m(self, device: str, override: int | None = None) -> int:
        return override if override is not None else (self.m_cuda if device == "cuda" else self.m_cpu)

    def gemm(self, device: str, override: int | None = None) -> tuple[int, int, int]:
        """(M, N, K) of the GEMM."""
        return self.m(device, override), self.n, self.k

    def describe(self, device: str, override: int | None = None) -> str:
        return f"{self.m(device, override)}x{self.n}x{self.k}"


@dataclass(frozen=True)
class ConvShape:
    """Conv2d of x[B, C_in, H, W] with a weight [C_out, C_in, kh, kw] (groups=1, dilation 1)."""

    name: str
    c_in: int
    c_out: int
    kernel: int
    hw: int           # input height = width
    stride: int
    padding: int
    batch_cpu: int
    batch_cuda: int
    source: str

    op = "conv2d"

    def batch(self, device: str, override: int | None = None) -> int:
        return override if override is not None else (self.batch_cuda if device == "cuda" else self.batch_cpu)

    @property
    def n(self) -> int:
        return self.c_out

    @property
    def k(self) -> int:
        return self.c_in * self.kernel * self.kernel

    @property
    def hw_out(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def gemm(self, device: str, override: int | None = None) -> tuple[int, int, int]:
        """(M, N, K) of the implicit GEMM: M = B * H_out * W_out output pixels."""
        return self.batch(device, override) * self.hw_out ** 2, self.n, self.k

    def describe(self, device: str, override: int | None = None) -> str:
        b = self.batch(device, override)
        return f"{b}x{self.c_in}x{self.hw}x{self.hw} k{self.kernel} -> {self.c_out}"


_BERT = "BERT-base/large (hidden 768/1024, FFN 3072/4096); CPU M = 4 x 128 tokens"
_LLAMA = "LLaMA-7B / Llama-3-8B (hidden 4096, FFN 11008/14336, GQA k/v 1024)"
_VIT = "ViT-B/16 (197 tokens per image; MLP 768-3072-768)"
_SQUARE = "square M=N=K=4096 GEMM, the usual sparse-GEMM comparison point (CPU M = 128)"
# OPT-30B: d_model 7168, 56 heads, 48 layers (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language
# Models", arXiv:2205.01068, Table 1); FFN 4 x 7168 = 28672 (ffn_dim in the facebook/opt-30b config.json). One of
# the models Flash-LLM (Xia et al. 2023, arXiv:2309.10285) evaluates its skinny unstructured-sparse kernel on.
_OPT30 = "OPT-30B (hidden 7168, FFN 28672; arXiv:2205.01068 Table 1, HF facebook/opt-30b); CPU M = 16 (decode)"
_GPU_ONLY = ("cuda",)

LINEAR_SHAPES: tuple[LinearShape, ...] = (
    LinearShape("bert-base.mlp_up", 3072, 768, 512, 4096, _BERT),
    LinearShape("bert-base.mlp_down", 768, 3072, 512, 4096, _BERT),
    LinearShape("bert-base.attn_qkv", 2304, 768, 512, 4096, _BERT + " (fused q,k,v)"),
    LinearShape("bert-base.attn_out", 768, 768, 512, 4096, _BERT),
    LinearShape("bert-large.mlp_up", 4096, 1024, 512, 4096, _BERT),
    LinearShape("bert-large.mlp_down", 1024, 4096, 512, 4096, _BERT),
    LinearShape("bert-large.attn_proj", 1024, 1024, 512, 4096, _BERT + " (each of q, k, v, o)"),
    LinearShape("vit-b.mlp_up", 3072, 768, 197, 197 * 32, _VIT),
    LinearShape("vit-b.mlp_down", 768, 3072, 197, 197 * 32, _VIT),
    LinearShape("llama-7b.attn_proj", 4096, 4096, 128, 2048, _LLAMA + " (each of q, k, v, o; also Llama-3 q, o)"),
    LinearShape("llama-7b.mlp_gate_up", 11008, 4096, 128, 2048, _LLAMA + " (each of gate, up)"),
    LinearShape("llama-7b.mlp_down", 4096, 11008, 128, 2048, _LLAMA),
    LinearShape("llama3-8b.attn_kv", 1024, 4096, 128, 2048, _LLAMA + " (each of k, v)"),
    LinearShape("llama3-8b.mlp_gate_up", 14336, 4096, 128, 2048, _LLAMA + " (each of gate, up)"),
    LinearShape("llama3-8b.mlp_down", 4096, 14336, 128, 2048, _LLAMA),
    LinearShape("square.4096", 4096, 4096, 128, 4096, _SQUARE, _GPU_ONLY),
    LinearShape("opt-30b.attn_proj", 7168, 7168, 16, 2048, _OPT30 + " (each of q, k, v, out_proj)", _GPU_ONLY),
    LinearShape("opt-30b.fc1", 28672, 7168, 16, 2048, _OPT30, _GPU_ONLY),
    LinearShape("opt-30b.fc2", 7168, 28672, 16, 2048, _OPT30, _GPU_ONLY),
)

_R50 = "ResNet-50 at 224x224, a non-downsampling bottleneck block"
_R50_DOWN = "ResNet-50 (v1.5) at 224x224, a stage's first bottleneck: stride 2 in its 3x3 conv and projection shortcut"
_MBV2 = "MobileNetV2 at 224x224, pointwise conv"

CONV_SHAPES: tuple[ConvShape, ...] = (
    ConvShape("resnet50.layer1.conv1x1_in", 256, 64, 1, 56, 1, 0, 1, 32, _R50),
    ConvShape("resnet50.layer1.conv3x3", 64, 64, 3, 56, 1, 1, 1, 32, _R50),
    ConvShape("resnet50.layer1.conv1x1_out", 64, 256, 1, 56, 1, 0, 1, 32, _R50),
    ConvShape("resnet50.layer2.conv3x3", 128, 128, 3, 28, 1, 1, 1, 32, _R50),
    ConvShape("resnet50.layer3.conv1x1_in", 1024, 256, 1, 14, 1, 0, 1, 32, _R50),
    ConvShape("resnet50.layer3.conv3x3", 256, 256, 3, 14, 1, 1, 1, 32, _R50),
    ConvShape("resnet50.layer4.conv3x3", 512, 512, 3, 7, 1, 1, 1, 32, _R50),
    ConvShape("resnet50.layer4.conv1x1_out", 512, 2048, 1, 7, 1, 0, 1, 32, _R50),
    ConvShape("resnet50.layer2.conv3x3_s2", 128, 128, 3, 56, 2, 1, 1, 32, _R50_DOWN),
    ConvShape("resnet50.layer3.conv3x3_s2", 256, 256, 3, 28, 2, 1, 1, 32, _R50_DOWN),
    ConvShape("resnet50.layer4.conv3x3_s2", 512, 512, 3, 14, 2, 1, 1, 32, _R50_DOWN),
    ConvShape("resnet50.layer3.downsample", 512, 1024, 1, 28, 2, 0, 1, 32, _R50_DOWN),
    ConvShape("mobilenetv2.expand_32_192", 32, 192, 1, 28, 1, 0, 1, 32, _MBV2),
    ConvShape("mobilenetv2.expand_64_384", 64, 384, 1, 14, 1, 0, 1, 32, _MBV2),
    ConvShape("mobilenetv2.project_384_64", 384, 64, 1, 14, 1, 0, 1, 32, _MBV2),
    ConvShape("mobilenetv2.project_960_160", 960, 160, 1, 7, 1, 0, 1, 32, _MBV2),
    ConvShape("mobilenetv2.last_320_1280", 320, 1280, 1, 7, 1, 0, 1, 32, _MBV2),
)

QUICK_LINEAR: tuple[str, ...] = ("bert-base.mlp_up",)
QUICK_CONV: tuple[str, ...] = ("resnet50.layer3.conv3x3",)

_BY_NAME: dict[str, LinearShape | ConvShape] = {s.name: s for s in LINEAR_SHAPES + CONV_SHAPES}


def shape_names(op: str | None = None, device: str | None = None) -> list[str]:
    """Names of the known shapes (of one op, "linear" or "conv2d", if given; of the default sweep on ``device``,
    if given: a shape whose ``default_devices`` leaves the device out is skipped)."""
    return [s.name for s in LINEAR_SHAPES + CONV_SHAPES if (op is None or s.op == op)
            and (device is None or device in getattr(s, "default_devices", (device,)))]


def get_shapes(names: list[str] | tuple[str, ...]) -> list[LinearShape | ConvShape]:
    """Look shapes up by name; a name ending in '*' selects every shape with that prefix."""
    out: list[LinearShape | ConvShape] = []
    for name in names:
        if name.endswith("*"):
            hits = [s for s in _BY_NAME.values() if s.name.startswith(name[:-1])]
        else:
            hits = [_BY_NAME[name]] if name in _BY_NAME else []
        if not hits:
            raise ValueError(f"shapes: unknown shape {name!r}; expected one of {shape_names()} "
                             "(or a prefix ending in '*', e.g. 'llama-7b.*')")
        out += [s for s in hits if s not in out]
    return out
