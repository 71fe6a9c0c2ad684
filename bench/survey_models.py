"""Run model zoos through sparsekit's two user flows and record what works, not how fast.

    python bench/survey_models.py --zoo hf --mode channel     # Hugging Face transformers, small configs
    python bench/survey_models.py --zoo torchvision timm --mode channel sparsify --out bench/results

``channel``: l1_mean channel pruning (50%, layer-wise) -> ``compact()`` -> ``sk.verify`` against the masked model;
reports the parameters removed, the prunable channel groups and the commonest reasons groups stay whole.
``sparsify``: 90% element pruning -> ``sk.sparsify`` (every layer with zeros swapped: min_speedup ~0, one rep, no
timing verdicts) -> ``sk.verify`` -> ``sk.save`` / ``sk.load`` into a fresh model -> ``sk.verify``; reports the
formats chosen. Models are untrained (random weights), inputs small; a model whose activations grow large is
compared with rtol 1e-5 besides atol 1e-4.

torchvision and timm are not sparsekit dependencies: install them without their dependencies so the installed torch
stays (``pip install --no-deps torchvision==<the release matching torch> timm``). A torchvision wheel built for a
CUDA torch fails to register its C++ ops on a CPU-only torch; its models need none of them, so this script then
imports it without them (noted in the output).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import sparsekit as sk

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "regnet_x_400mf",
               "densenet121", "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "inception_v3", "mnasnet0_5",
               "vgg11_bn", "alexnet", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"]
TIMM = ["resnet50", "resnetv2_50", "efficientnet_b0", "mobilenetv3_large_100", "convnext_nano", "regnety_002",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "cait_xxs24_224",
        "levit_128s", "resnest14d", "ghostnet_100", "rexnet_100", "poolformer_s12", "edgenext_xx_small",
        "mobilevitv2_050", "coatnet_nano_rw_224", "repvgg_a0", "dla34", "hrnet_w18_small", "dpn68", "nfnet_f0",
        "eva02_tiny_patch14_224"]
_FULL_SIZE = ("vit", "deit", "swin", "maxvit", "eva", "cait", "levit", "coat", "beit")


def _torchvision() -> types.ModuleType:
    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision"]
    try:
        import torchvision
    except RuntimeError as e:     # a CUDA build's ops on a CPU torch: its meta registrations fail, models are fine
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
        print("(torchvision imported without its C++ op registrations: a CUDA wheel on a CPU torch)")
    return torchvision


def _image(name: str, big: int = 224) -> tuple:
    size = 299 if "inception" in name else big if any(s in name for s in _FULL_SIZE) else 64
    return (torch.randn(2, 3, size, size),)


def _hf_cases() -> dict[str, Callable[[], tuple]]:
    import transformers as T

    T.logging.set_verbosity_error()
    ids = lambda: (torch.randint(0, 100, (2, 12)),)  # noqa: E731

    def text(cfg, model, **kw):
        base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
        return lambda: (model(cfg(**{**base, **kw})).eval(), ids())

    def image(cfg, model, size=32, **kw):
        return lambda: (model(cfg(**kw)).eval(), (torch.randn(2, 3, size, size),))

    vit = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
               patch_size=8)
    gpt2 = lambda: (sk.nn.conv1d_to_linear(T.GPT2Model(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2,  # noqa: E731
                                                                    n_head=4))).eval(), ids())
    t5 = lambda: (T.T5Model(T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,  # noqa: E731
                                       num_heads=4)).eval(),
                  (torch.randint(0, 100, (2, 12)), None, torch.randint(0, 100, (2, 5))))
    w2v = lambda: (T.Wav2Vec2Model(T.Wav2Vec2Config(  # noqa: E731
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)).eval(), (torch.randn(2, 800),))
    return {
        "bert": text(T.BertConfig, T.BertModel),
        "roberta": text(T.RobertaConfig, T.RobertaModel),
        "distilbert": text(T.DistilBertConfig, T.DistilBertModel, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
        "albert": text(T.AlbertConfig, T.AlbertModel, embedding_size=32),
        "deberta-v2": text(T.DebertaV2Config, T.DebertaV2Model),
        "gpt2 (conv1d_to_linear)": gpt2,
        "gpt-neox": text(T.GPTNeoXConfig, T.GPTNeoXModel),
        "gpt-j": text(T.GPTJConfig, T.GPTJModel, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
        "opt": text(T.OPTConfig, T.OPTModel, ffn_dim=128, word_embed_proj_dim=64),
        "bloom": text(T.BloomConfig, T.BloomModel, n_layer=2, n_head=4),
        "falcon": text(T.FalconConfig, T.FalconModel, new_decoder_architecture=True, num_kv_heads=2),
        "llama": text(T.LlamaConfig, T.LlamaModel, num_key_value_heads=2),
        "mistral": text(T.MistralConfig, T.MistralModel, num_key_value_heads=2),
        "mixtral": text(T.MixtralConfig, T.MixtralModel, num_key_value_heads=2, num_local_experts=4),
        "qwen2": text(T.Qwen2Config, T.Qwen2Model, num_key_value_heads=2),
        "phi": text(T.PhiConfig, T.PhiModel),
        "phi3": text(T.Phi3Config, T.Phi3Model, num_key_value_heads=2, pad_token_id=0),
        "gemma": text(T.GemmaConfig, T.GemmaModel, num_key_value_heads=2, head_dim=16),
        "gemma2": text(T.Gemma2Config, T.Gemma2Model, num_key_value_heads=2, head_dim=16),
        "stablelm": text(T.StableLmConfig, T.StableLmModel, num_key_value_heads=2),
        "olmo": text(T.OlmoConfig, T.OlmoModel, num_key_value_heads=2, pad_token_id=0),
        "t5": t5,
        "clip-text": text(T.CLIPTextConfig, T.CLIPTextModel),
        "vit": image(T.ViTConfig, T.ViTModel, **vit),
        "deit": image(T.DeiTConfig, T.DeiTModel, **vit),
        "dinov2": image(T.Dinov2Config, T.Dinov2Model, **{k: v for k, v in vit.items() if k != "intermediate_size"}),
        "beit": image(T.BeitConfig, T.BeitModel, use_relative_position_bias=True, **vit),
        "clip-vision": image(T.CLIPVisionConfig, T.CLIPVisionModel, **vit),
        "siglip-vision": image(T.SiglipVisionConfig, T.SiglipVisionModel, **vit),
        "convnext": image(T.ConvNextConfig, T.ConvNextModel, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
        "resnet": image(T.ResNetConfig, T.ResNetModel, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                        embedding_size=32),
        "swin": image(T.SwinConfig, T.SwinModel, image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                      num_heads=[2, 4], window_size=4),
        "segformer": image(T.SegformerConfig, T.SegformerModel, size=64, hidden_sizes=[16, 32, 64, 128],
                           num_attention_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1]),
        "mobilevit": image(T.MobileViTConfig, T.MobileViTModel, size=64, image_size=64),
        "wav2vec2": w2v,
    }


def cases(zoo: str) -> dict[str, Callable[[], tuple]]:
    """name -> a function making (model in eval mode, example inputs)."""
    if zoo == "hf":
        if importlib.util.find_spec("torchvision") is not None:
            _torchvision()      # (transformers imports it when it is there)
        return _hf_cases()
    if zoo == "torchvision":
        tv = _torchvision()
        return {n: (lambda n=n: (getattr(tv.models, n)(num_classes=10).eval(), _image(n))) for n in TORCHVISION}
    if zoo == "timm":
        _torchvision()      # (timm imports it)
        import timm

        return {n: (lambda n=n: (timm.create_model(n, pretrained=False, num_classes=10).eval(), _image(n)))
                for n in TIMM}
    raise ValueError(f"zoo must be hf, torchvision or timm, got {zoo!r}")


def _check(a: torch.nn.Module, b: torch.nn.Module, x: tuple) -> None:
    sk.verify(a, b, x, atol=1e-4, rtol=1e-5)


def run_channel(make: Callable[[], tuple]) -> str:
    model, x = make()
    pruner = sk.prune.Pruner(model, x, criterion="l1_mean", granularity="channel", scope="layer", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    _check(model, small, x)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    graph = pruner._dependency_graph()
    reasons = collections.Counter((g.reason or "").split(" (")[0][:70] for g in graph.groups if not g.prunable)
    top = "; ".join(f"{r} x{c}" for r, c in reasons.most_common(2))
    return f"{1 - n1 / n0:.0%} of parameters removed, {sum(g.prunable for g in graph.groups)} prunable groups; " \
           f"kept whole: {top}"


def run_sparsify(make: Callable[[], tuple]) -> str:
    model, x = make()
    sk.prune.Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.9).step()
    fast, report = sk.sparsify(model, x, cache=False, min_speedup=1e-6, reps=1, measure_model=False)
    _check(model, fast, x)
    with tempfile.TemporaryDirectory() as d:
        sk.save(fast, d)
        _check(model, sk.load(d, make()[0]), x)
    choices = collections.Counter(d.choice for d in report.layers)
    return ", ".join(f"{k} x{v}" for k, v in choices.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", nargs="+", default=["hf"], choices=["hf", "torchvision", "timm"])
    ap.add_argument("--mode", nargs="+", default=["channel", "sparsify"], choices=["channel", "sparsify"])
    ap.add_argument("--only", nargs="*", default=None, help="model names to run (default: all of the zoo)")
    ap.add_argument("--out", default=None, help="directory for a markdown report")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    lines = [f"# Model survey ({datetime.datetime.now():%Y-%m-%d %H:%M}), sparsekit {sk.__version__}, "
             f"torch {torch.__version__}", "", "Modes: see bench/survey_models.py. ok = ran and verified.", ""]
    failed = 0
    for zoo in args.zoo:
        zoo_cases = cases(zoo)
        for mode in args.mode:
            lines += [f"## {zoo}, {mode}", "", "| model | result | details |", "|---|---|---|"]
            for name, make in zoo_cases.items():
                if args.only and name not in args.only:
                    continue
                torch.manual_seed(0)
                t0 = time.time()
                try:
                    detail, status = (run_channel if mode == "channel" else run_sparsify)(make), "ok"
                except Exception as e:  # noqa: BLE001 - reported per model
                    detail, status = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "FAILED"
                    failed += 1
                row = f"| {name} | {status} | {detail} ({time.time() - t0:.0f} s) |"
                print(row, flush=True)
                lines.append(row)
            lines.append("")
    if args.out:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(args.out) / f"survey_{'-'.join(args.zoo)}_{stamp}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
