"""What Hugging Face attention modules return besides their output: attention weights a model returns keep its
heads (they would lose maps); key / value caches shrink with the heads; tuple concatenation ``(h,) + outs[1:]``
keeps the channels it carries."""

import pytest
import torch
from _hf import run_transformers_script
from torch import nn

import sparsekit as sk
from sparsekit.prune.graph import DependencyGraph

_SCRIPT = r"""
import warnings
import torch, transformers
import sparsekit as sk
from sparsekit.prune.graph import DependencyGraph
warnings.filterwarnings("ignore")
ids = torch.randint(0, 100, (2, 8))


def bert(**kw):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, attn_implementation="eager", **kw)).eval()


def gpt2(**kw):
    torch.manual_seed(0)
    return sk.nn.conv1d_to_linear(transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, attn_implementation="eager", **kw))).eval()


def llama(**kw):
    torch.manual_seed(0)
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager", **kw)).eval()


class Select(torch.nn.Module):
    # returns the chosen fields of the model's output
    def __init__(self, model, fields, **kw):
        super().__init__()
        self.model, self.fields, self.kw = model, fields, kw

    def forward(self, ids):
        out = self.model(input_ids=ids, **self.kw)
        return tuple(out[f] for f in self.fields)


def heads(model, inputs):
    graph = DependencyGraph.build(model, inputs)
    return [g for g in graph.groups if g.kind == "heads"]


def pruned(model, inputs):
    pruner = sk.prune.Pruner(model, inputs, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    return pruner.compact()


# attention weights returned by the model: every layer's heads pinned, naming the model output; outputs equal
for make in (bert, llama):
    model = make(output_attentions=True)
    hs = heads(model, (ids,))
    assert len(hs) == 2 and not any(g.prunable for g in hs), [g.reason for g in hs]
    assert all("model output" in g.reason for g in hs), [g.reason for g in hs]
    small = pruned(model, (ids,))
    sk.verify(model, small, (ids,), atol=1e-4)
    # computed but not returned: heads prunable
    hs = heads(Select(make(), ["last_hidden_state"], output_attentions=True, use_cache=False), (ids,))
    assert len(hs) == 2 and all(g.prunable for g in hs), [g.reason for g in hs]

model = Select(gpt2(use_cache=False), ["last_hidden_state", "attentions"], output_attentions=True)
assert not any(g.prunable for g in heads(model, (ids,)))
sk.verify(model, pruned(model, (ids,)), (ids,), atol=1e-4)

# GPT-2's key / value cache (present tuples, concatenated onto the block outputs as (h,) + outputs) shrinks with
# the heads: the compacted model makes and reads its own cache
model = Select(gpt2(use_cache=True), ["last_hidden_state", "past_key_values"])
assert all(g.prunable for g in heads(model, (ids,)))
small = pruned(model, (ids,))
assert small.model.h[0].attn.num_heads == 2
with torch.no_grad():
    (h, cache), (ref, ref_cache) = small(ids), model(ids)      # model: the masked reference
assert cache[0][0].shape[1] == 2 and ref_cache[0][0].shape[1] == 4
torch.testing.assert_close(h, ref, atol=1e-4, rtol=1e-4)
print("HF-OUTPUTS-OK")
"""


def test_hf_attention_weights_pin_heads_and_caches_shrink():
    run_transformers_script(_SCRIPT, "HF-OUTPUTS-OK")


class _Attention(nn.Module):
    """A fused-qkv attention returning (output, weights), as GPT-2-style modules do."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.num_heads, self.head_dim = heads, dim // heads

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) / self.head_dim ** 0.5).softmax(-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, -1)), w


class _Block(nn.Module):
    """``outputs = (h,) + attn_outputs[1:]``: a tuple concatenation carrying the attention weights along."""

    def __init__(self, returns_weights: bool) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 16), _Attention(), nn.Linear(16, 8)
        self.returns_weights = returns_weights

    def forward(self, x):
        outs = self.attn(self.inp(x))
        outputs = (self.out(outs[0]),) + outs[1:]
        return outputs if self.returns_weights else outputs[0]


@pytest.mark.parametrize("tokens", [5, 4])     # 4 tokens: [B, heads, T, T] has the head count on three dims
@pytest.mark.parametrize("returns_weights", [False, True])
def test_tuple_concatenation_carries_the_attention_weights_to_the_output(returns_weights, tokens):
    torch.manual_seed(0)
    model = _Block(returns_weights).eval()
    x = torch.randn(2, tokens, 8)
    graph = DependencyGraph.build(model, x)
    (h,) = [g for g in graph.groups if g.kind == "heads"]
    assert h.prunable is not returns_weights
    if returns_weights:
        assert "model output" in h.reason
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    sk.verify(model, small, x, atol=1e-5)
    assert (small.attn.num_heads < 4) is not returns_weights


class _KeysOut(_Attention):
    """Fused-qkv attention that returns its keys as ``[B, T, heads, head_dim]`` (heads on dim 2)."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        w = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / self.head_dim ** 0.5).softmax(-1)
        return self.proj((w @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, -1)), k


class _ReturnsKeys(nn.Module):
    def __init__(self, returns_keys: bool) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 16), _KeysOut(), nn.Linear(16, 8)
        self.returns_keys = returns_keys

    def forward(self, x):
        h, k = self.attn(self.inp(x))
        return (self.out(h), k) if self.returns_keys else self.out(h)


@pytest.mark.parametrize("tokens", [5, 4])     # 4: the tokens dim has the head count too
@pytest.mark.parametrize("returns_keys", [False, True])
def test_a_per_head_tensor_with_heads_on_another_dim(tokens, returns_keys):
    torch.manual_seed(1)
    model = _ReturnsKeys(returns_keys).eval()
    x = torch.randn(2, tokens, 8)
    (h,) = [g for g in DependencyGraph.build(model, x).groups if g.kind == "heads"]
    assert h.prunable is not returns_keys, h.reason
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    sk.verify(model, pruner.compact(), x, atol=1e-5)


def test_heads_probe_with_an_input_that_requires_grad():
    """The probe copies the call's arguments (a non-leaf tensor requiring grad cannot be deep-copied): the heads
    stay prunable."""
    model = _Block(False).eval()
    x = torch.randn(2, 5, 8, requires_grad=True) * 1.0
    (h,) = [g for g in DependencyGraph.build(model, x).groups if g.kind == "heads"]
    assert h.prunable, h.reason
