"""Hugging Face transformers models (built from small configs, no download) through the user flow "prune my HF
model, make it faster": BertModel (block pruning, sparsify, same outputs, the report's layer names,
torch.compile(fullgraph=True), a training step, save / load), GPT2Model (Conv1D -> nn.Linear, sparsify, head and
MLP compaction) and LlamaModel (sparsify, grouped-query head and gated-MLP compaction)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.nn import SparseLinear

transformers = pytest.importorskip("transformers")


def _block_prune(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """``model``, its Linears masked to 50% 32x32 blocks (in place)."""
    sk.prune.Pruner(model, ids, criterion="magnitude", granularity="block", block=(32, 32), scope="layer",
                    sparsity=0.5).step()
    return model


def _sparsify(masked: nn.Module, ids: torch.Tensor):
    """sparsify with every zero-holding Linear swapped (tiny layers: the swap is forced, the flow is tested)."""
    return sk.sparsify(masked, ids, formats=["dense", "bsr"], blocks=[(32, 32)], min_speedup=1e-9, cache=False,
                       reps=1, measure_model=False)


def _compact_half(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """``model`` (masked in place) and its compacted copy, half of every prunable channel group removed."""
    pruner = sk.prune.Pruner(model, ids, criterion="l1", granularity="channel", scope="layer", sparsity=0.5)
    pruner.step()
    return pruner.compact()


@pytest.fixture(scope="module")
def pruned_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    return cfg, _block_prune(copy.deepcopy(model), ids), ids


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_sparsify_swaps_every_linear_of_a_hf_bert_and_keeps_its_outputs(pruned_bert):
    cfg, masked, ids = pruned_bert
    fast, report = _sparsify(masked, ids)
    linears = [n for n, m in masked.named_modules() if isinstance(m, nn.Linear)]
    swapped = [n for n, m in fast.named_modules() if isinstance(m, SparseLinear)]
    assert len(linears) == 6 * cfg.num_hidden_layers and swapped == linears
    torch.testing.assert_close(_hidden(fast, ids), _hidden(masked, ids), atol=1e-5, rtol=1e-5)
    # the report's columns fit Hugging Face's long layer names
    text = str(report)
    name = "encoder.layer.1.attention.output.dense"
    row = next(line for line in text.splitlines() if line.startswith(name))
    assert row[len(name)] == " " and text.splitlines()[1].index("weight") < row.index("64x64") + 5


def test_sparsified_hf_bert_compiles_trains_and_round_trips(pruned_bert, tmp_path):
    cfg, masked, ids = pruned_bert
    fast, _ = _sparsify(masked, ids)
    expected = _hidden(fast, ids)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    torch.testing.assert_close(_hidden(compiled, ids), expected, atol=1e-5, rtol=1e-5)

    sk.save(fast, tmp_path / "bert")
    loaded = sk.load(tmp_path / "bert", transformers.BertModel(cfg, add_pooling_layer=False).eval())
    torch.testing.assert_close(_hidden(loaded, ids), expected, atol=0, rtol=0)

    # one optimizer step on the sparse values: the loss falls and nothing leaves the stored pattern
    layer = fast.encoder.layer[0].intermediate.dense
    before = layer.dense_weight2d().eq(0)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)   # eval mode: no dropout, so the two losses compare
    loss0 = fast(ids).last_hidden_state.square().mean()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = fast(ids).last_hidden_state.square().mean()
    assert loss1 < loss0
    assert bool(layer.dense_weight2d().eq(0)[before].all())


def test_gpt2_conv1d_layers_become_linears_then_prune_and_sparsify(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    lin = sk.nn.conv1d_to_linear(model)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 4 * cfg.n_layer and all(isinstance(lin.get_submodule(n), nn.Linear) for n in conv1d)
    assert type(model.h[0].attn.c_attn).__name__ == "Conv1D"          # the original is left alone (a copy)
    torch.testing.assert_close(_hidden(lin, ids), _hidden(model, ids), atol=1e-6, rtol=1e-6)

    fast, _ = _sparsify(_block_prune(lin, ids), ids)
    assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == len(conv1d)
    torch.testing.assert_close(_hidden(fast, ids), _hidden(lin, ids), atol=1e-5, rtol=1e-5)
    sk.save(fast, tmp_path / "gpt2")
    loaded = sk.load(tmp_path / "gpt2", sk.nn.conv1d_to_linear(transformers.GPT2Model(cfg).eval()))
    torch.testing.assert_close(_hidden(loaded, ids), _hidden(fast, ids), atol=0, rtol=0)

    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.nn.conv1d_to_linear("gpt2")
    with pytest.raises(ValueError, match="is itself a Conv1D"):
        sk.nn.conv1d_to_linear(model.h[0].attn.c_attn)


def test_gpt2_heads_and_mlp_channels_compact(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)
    model = sk.nn.conv1d_to_linear(transformers.GPT2Model(cfg).eval())
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    small = _compact_half(model, ids)
    # whole heads of the fused c_attn (q|k|v) and c_proj, and the MLP (c_fc -> tanh GELU written with torch.pow
    # -> c_proj) shrink; the LayerNorm-normalised residual stream stays whole
    head_dim = cfg.n_embd // cfg.n_head
    for block in small.h:
        attn = block.attn
        assert (attn.num_heads, attn.split_size, attn.embed_dim) == (2, 2 * head_dim, 2 * head_dim)
        assert attn.c_attn.out_features == 3 * 2 * head_dim and attn.c_proj.out_features == cfg.n_embd
        assert block.mlp.c_fc.out_features == 2 * cfg.n_embd
    torch.testing.assert_close(_hidden(small, ids), _hidden(model, ids), atol=1e-5, rtol=1e-5)
    sk.save(small, tmp_path / "small")
    loaded = sk.load(tmp_path / "small", sk.nn.conv1d_to_linear(transformers.GPT2Model(cfg).eval()))
    assert loaded.h[1].attn.num_heads == 2
    torch.testing.assert_close(_hidden(loaded, ids), _hidden(small, ids), atol=0, rtol=0)


def test_llama_sparsifies_and_its_heads_and_gated_mlp_compact(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    masked = _block_prune(copy.deepcopy(model), ids)
    fast, _ = _sparsify(masked, ids)
    assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == 7 * cfg.num_hidden_layers
    torch.testing.assert_close(_hidden(fast, ids), _hidden(masked, ids), atol=1e-5, rtol=1e-5)

    small = _compact_half(model, ids)
    # gate_proj * up_proj -> down_proj shrink together; grouped-query attention loses whole key/value groups
    # (one of two: its key/value head and the two query heads sharing it)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in small.layers:
        attn = layer.self_attn
        assert layer.mlp.down_proj.in_features == cfg.intermediate_size // 2
        assert (attn.num_heads, attn.num_key_value_heads, attn.num_key_value_groups) == (2, 1, 2)
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (
            2 * head_dim, head_dim, 2 * head_dim)
    torch.testing.assert_close(_hidden(small, ids), _hidden(model, ids), atol=1e-5, rtol=1e-5)
    sk.save(small, tmp_path / "small")
    loaded = sk.load(tmp_path / "small", transformers.LlamaModel(cfg).eval())
    assert loaded.layers[0].self_attn.num_key_value_heads == 1
    torch.testing.assert_close(_hidden(loaded, ids), _hidden(small, ids), atol=0, rtol=0)


def test_tracing_a_hf_model_first_leaves_torch_compile_working():
    # HFTracer swaps torch functions (torch.finfo, ...) for stand-ins while it traces; if torch._dynamo were
    # first imported in that window, its table of constant types kept the stand-in, and later torch.compile
    # guards failed with "isinstance() arg 2 must be a type" whenever a check reached it (set order: by chance).
    # Checked in a fresh interpreter, where nothing has imported torch._dynamo yet.
    import subprocess
    import sys

    code = """
import sys, torch, transformers, sparsekit as sk
assert "torch._dynamo" not in sys.modules
cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
sk.prune.graph.DependencyGraph.build(transformers.LlamaModel(cfg).eval(), torch.randint(0, 50, (1, 4)))
from torch._dynamo import utils
bad = [t for t in getattr(utils, "common_constant_types", ()) if not isinstance(t, type)]
assert not bad, bad
w = sk.formats.BSR.from_dense(torch.ones(32, 32), (16, 16))
f = torch.compile(lambda x: sk.ops.bsr_linear(x, w), fullgraph=True, backend="eager")   # guards on w.shape
assert torch.equal(f(torch.ones(2, 32)), torch.full((2, 32), 32.0))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
