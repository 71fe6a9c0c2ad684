"""More Hugging Face architectures (small configs, no download) through pruning, compaction and sparsify, each on
what once failed there: Qwen2's attention views its heads' output as ``hidden_size`` wide (its heads were pinned),
MobileViT's attention returns its context alone (the graph crashed), wav2vec 2.0's positional conv is under
``parametrizations.weight_norm`` (masks assumed one stored tensor), and ViT / T5 read a layer's ``.weight.dtype``
in their forward (a sparse layer had none); Gemma, which HFTracer does not trace, fell back to torch.export,
which failed on the key / value cache object handed to its attention layers; Gemma-2's static cache kept the
original number of key / value heads."""

from __future__ import annotations

from _hf import run_transformers_script

_SCRIPT = r'''
import tempfile, warnings
import torch, transformers as T
import sparsekit as sk
from sparsekit.nn import SparseConv2d, SparseLinear
warnings.filterwarnings("ignore")
torch.manual_seed(0)

def compact_half(make, x):
    model = make().eval()
    pruner = sk.prune.Pruner(model, x, criterion="l1_mean", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-4)
    return model, small

# Qwen2: key/value groups go (the o_proj input halves), and the saved model loads into a fresh one
qwen = lambda: T.Qwen2Model(T.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, use_cache=False))
ids = torch.randint(0, 64, (2, 7))
model, small = compact_half(qwen, ids)
attn = small.layers[0].self_attn
assert (attn.num_key_value_heads, attn.num_heads, attn.o_proj.in_features) == (1, 2, 16), attn
with tempfile.TemporaryDirectory() as d:
    sk.save(small, d)
    sk.verify(small, sk.load(d, qwen().eval()), ids, atol=1e-5)

# Gemma (which HFTracer does not support): torch.export traces it with use_cache off, the model keeps its cache
gemma = lambda: T.GemmaModel(T.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
model, small = compact_half(gemma, ids)
assert model.config.use_cache and small.layers[0].self_attn.num_key_value_heads == 1
with torch.no_grad():
    assert small(ids).past_key_values is not None

# Gemma-2 allocates its (static) cache from config.num_key_value_heads: the compacted model's config follows, and
# so does a fresh model's that the saved one loads into
gemma2 = lambda: T.Gemma2Model(T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8))
model, small = compact_half(gemma2, ids)          # (verify runs both with their caches)
assert (model.config.num_key_value_heads, model.config.num_attention_heads) == (2, 4)
assert (small.config.num_key_value_heads, small.config.num_attention_heads, small.config.head_dim) == (1, 2, 8)
with tempfile.TemporaryDirectory() as d:
    sk.save(small, d)
    shared = T.Gemma2Model(model.config).eval()     # a skeleton sharing the original's config object
    loaded = sk.load(d, shared)
    assert loaded.config.num_key_value_heads == 1 and model.config.num_key_value_heads == 2
    sk.verify(small, loaded, ids, atol=1e-5)
    rebuilt = sk.load(d, T.Gemma2Model(small.config).eval())   # a skeleton from the compacted config
    sk.verify(small, rebuilt, ids, atol=1e-5)

# MobileViT: an attention of the query / key / value kind returning a tensor, not a tuple
mvit = lambda: T.MobileViTModel(T.MobileViTConfig(image_size=64, hidden_sizes=[24, 32, 40],
                                                  neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48]))
model, small = compact_half(mvit, torch.randn(2, 3, 64, 64))
assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())

# wav2vec 2.0: the weight-normed positional conv carries a mask on top of weight_norm
w2v = lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                               conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                               num_conv_pos_embedding_groups=4))
compact_half(w2v, torch.randn(2, 800))

# ViT (pixels cast to projection.weight.dtype) and T5 (wo.weight.dtype) sparsified, saved and loaded
vit = lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8))
t5 = lambda: T.T5Model(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
for make, x in ((vit, (torch.randn(2, 3, 32, 32),)),
                (t5, (torch.randint(0, 64, (2, 7)), None, torch.randint(0, 64, (2, 3))))):
    model = make().eval()
    sk.prune.Pruner(model, x, criterion="magnitude", granularity="element", sparsity=0.9).step()
    fast, _ = sk.sparsify(model, x, formats=["csr"], min_speedup=1e-9, cache=False, reps=1, measure_model=False)
    assert any(isinstance(m, (SparseLinear, SparseConv2d)) for m in fast.modules())
    sk.verify(model, fast, x, atol=1e-5)
    with tempfile.TemporaryDirectory() as d:
        sk.save(fast, d)
        sk.verify(model, sk.load(d, make().eval()), x, atol=1e-5)
print("HF-MORE-OK")
'''


def test_more_hugging_face_architectures_prune_compact_and_sparsify():
    run_transformers_script(_SCRIPT, "HF-MORE-OK")
