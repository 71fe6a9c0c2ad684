"""LLM decoding, token by token: a Llama-shaped model (Hugging Face transformers' LlamaForCausalLM, random
weights, no download) with 90% of its Linear weights pruned in 32x32 blocks, sparsified, against the same model
dense, greedy generation with the KV cache, in one interleaved loop.

    python bench/bench_decode.py                          # TinyLlama-1.1B widths, 8 of its 22 layers, fp32
    python bench/bench_decode.py --layers 22 --new-tokens 64
    python bench/bench_decode.py --device cuda --dtype float16 --out gpu_out/results
    python bench/bench_decode.py --method compact          # structured: 50% of heads and MLP width removed
    python bench/bench_decode.py --method unstructured     # 50% of single weights (as SparseGPT / Wanda prune)
    python bench/bench_decode.py --method nm               # 2:4 (the sparse tensor cores' pattern)

Every step after the prompt multiplies one token's activations (M = 1) by every weight: decoding is the
memory-bound GEMV case, where a 90%-sparse weight moves a tenth of the bytes. The lm_head (vocabulary
projection) and the embeddings stay dense. --method compact removes whole key/value groups of the attention and
MLP channels instead (the dependency graph), giving a smaller dense model. --method unstructured prunes single
weights by magnitude in every Linear but lm_head (default 50%, the usual LLM unstructured setting) and lets
sparsify choose among dense, CSR and CSR with its bitmap (the skinny-input kernel); --method nm keeps the 2 largest
of every 4 weights along K and lets it choose among dense, NM and the two CSRs. The pruned model must generate the
same tokens as the masked one it came from (greedy; it computes the same products in another order, so a
near-tie could flip a token: the row says so if it does).
Writes <--out>/decode_<machine>_<date>.json/.md: medians of whole generate() calls, tokens/s, speedup.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import sparsekit as sk
from sparsekit.benchmark.machine import script_results
from sparsekit.timing import interleaved_median_ms

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# TinyLlama-1.1B (hidden 2048, MLP 5632, 32 heads, 4 key/value heads, 22 layers)
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4}


def build(layers: int, vocab: int, widths: dict) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench_decode.py needs the transformers package (pip install transformers)") from None
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**widths, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(cfg).eval()


def run(layers: int = 8, prompt_len: int = 32, new_tokens: int = 32, sparsity: float | None = None, reps: int = 5,
        device: str = "cpu", dtype: torch.dtype = torch.float32, vocab: int = 32000,
        widths: dict | None = None, min_speedup: float = 1.1, method: str = "block") -> dict:
    if sparsity is None:
        sparsity = 0.9 if method == "block" else 0.5
    dense = build(layers, vocab, widths or TINYLLAMA)
    prompt = torch.randint(0, vocab, (1, prompt_len))
    masked = copy.deepcopy(dense)
    if method == "block":
        sk.prune.Pruner(masked, prompt, criterion="magnitude", granularity="block", block=(32, 32), scope="layer",
                        sparsity=sparsity, ignore=[masked.lm_head]).step()
        pruning = f"{sparsity:.0%} 32x32 blocks in every Linear but lm_head, magnitude"
    elif method == "nm":
        sk.prune.Pruner(masked, prompt, criterion="magnitude", granularity="nm", n=2, m=4,
                        ignore=[masked.lm_head]).step()
        pruning = "2:4 (2 largest of every 4 along K) in every Linear but lm_head"
    elif method == "unstructured":
        sk.prune.Pruner(masked, prompt, criterion="magnitude", granularity="element", scope="layer",
                        sparsity=sparsity, ignore=[masked.lm_head]).step()
        pruning = f"{sparsity:.0%} of single weights in every Linear but lm_head, magnitude"
    else:   # whole key/value groups of the attention and MLP channels, removed: a smaller dense model
        pruner = sk.prune.Pruner(masked, prompt, criterion="l1", granularity="channel", scope="layer",
                                 sparsity=sparsity, ignore=[masked.lm_head])
        pruner.step()
        compacted = pruner.compact()
        pruning = f"{sparsity:.0%} of key/value groups and MLP channels per layer (l1), compacted"
    dense, masked = (m.to(device=device, dtype=dtype) for m in (dense, masked))   # masked: the reference
    prompt = prompt.to(device)
    t0 = time.perf_counter()
    if method != "compact":
        # the layers run at M = 1 while decoding: measure the candidates at that shape, not at the prompt's
        formats = {"block": ["dense", "bsr"], "unstructured": ["dense", "csr"], "nm": ["dense", "nm", "csr"]}[method]
        fast, report = sk.sparsify(masked, prompt[:, :1], formats=formats, blocks=[(32, 32), (16, 16)],
                                   min_speedup=min_speedup, cache=False, reps=5, measure_model=False)
        choices = sorted({d.choice for d in report.layers})
    else:
        fast, choices = compacted.to(device=device, dtype=dtype), ["compact"]
    sparsify_s = time.perf_counter() - t0

    def generate(model: torch.nn.Module) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)

    with torch.no_grad():
        same = bool(torch.equal(generate(masked), generate(fast)))
    t = interleaved_median_ms({"dense": lambda: generate(dense), "sparse": lambda: generate(fast)}, warmup=1,
                              reps=reps, device=device)
    params = sum(p.numel() for p in dense.parameters())
    return {"model": f"Llama-shaped ({layers} layers, hidden {dense.config.hidden_size}, MLP "
                     f"{dense.config.intermediate_size}, {params / 1e6:.0f}M params)",
            "pruning": pruning, "method": method,
            "device": device, "dtype": str(dtype).split(".")[-1], "prompt": prompt_len, "new_tokens": new_tokens,
            "dense_ms": t["dense"], "sparse_ms": t["sparse"], "speedup": t["dense"] / t["sparse"],
            "dense_tok_s": new_tokens / t["dense"] * 1e3, "sparse_tok_s": new_tokens / t["sparse"] * 1e3,
            "same_tokens": same, "sparse_layers": sum(isinstance(m, sk.nn.SparseLinear) for m in fast.modules()),
            "choices": choices, "sparsify_s": sparsify_s}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (TinyLlama has 22; default 8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    ap.add_argument("--method", default="block", choices=["block", "compact", "unstructured", "nm"],
                    help="block: 32x32 blocks, sparsified (default); compact: whole key/value groups and MLP "
                         "channels removed through the dependency graph; unstructured: single weights, sparsified; "
                         "nm: 2:4, sparsified (--sparsity does not apply)")
    ap.add_argument("--sparsity", type=float, default=None,
                    help="fraction pruned (default 0.9 for block, 0.5 for compact and unstructured)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000, Llama's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--out", default=str(RESULTS), metavar="DIR", help="where the .json/.md go (default bench/results)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if min(a.layers, a.prompt, a.new_tokens, a.reps, a.vocab) < 1:
        raise SystemExit("--layers, --prompt, --new-tokens, --reps and --vocab must be >= 1")
    if a.sparsity is not None and not 0 <= a.sparsity < 1:
        raise SystemExit(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    row = run(a.layers, a.prompt, a.new_tokens, a.sparsity, a.reps, a.device, DTYPES[a.dtype], a.vocab,
              method=a.method)
    base, info, stamp, where = script_results(a.out, "decode", a.device)
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "argv": sys.argv, "rows": [row]}, indent=1,
                                                    default=str))
    lines = [f"# greedy decoding, dense vs sparsified ({where}, {a.dtype}, torch {torch.__version__}, {stamp} UTC)",
             "", f"`{' '.join(sys.argv)}`; medians of {a.reps} interleaved generate() calls", "",
             "| model | pruning | prompt + new tokens | dense tok/s | sparse tok/s | speedup | same tokens | choices |",
             "|---|---|---|---|---|---|---|---|",
             f"| {row['model']} | {row['pruning']} | {row['prompt']} + {row['new_tokens']} | "
             f"{row['dense_tok_s']:.1f} | {row['sparse_tok_s']:.1f} | {row['speedup']:.2f}x | "
             f"{'yes' if row['same_tokens'] else 'NO (a near-tie flipped)'} | {', '.join(row['choices'])} |"]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
