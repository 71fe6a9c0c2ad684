"""Torch transformers: decoder self- / cross-attention heads and feed-forward widths, and attention heads scored
by data-dependent criteria (per-head outputs and gates), compacted and verified against the masked model."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit.prune.compact import PrunedMultiheadAttention
from sparsekit.prune.graph import DependencyGraph
from sparsekit.prune.head_taps import attention_path


def _params(m):
    return sum(p.numel() for p in m.parameters())


class Seq2Seq(nn.Module):
    """Encoder-decoder: ``nn.Transformer`` or an ``nn.TransformerEncoder`` + ``nn.TransformerDecoder`` pair."""

    def __init__(self, whole=False, batch_first=True, norm_first=False):
        super().__init__()
        torch.manual_seed(0)
        self.whole, self.batch_first = whole, batch_first
        self.src_emb, self.tgt_emb = nn.Linear(6, 16), nn.Embedding(11, 16)
        kw = {"dropout": 0.0, "batch_first": batch_first, "norm_first": norm_first}
        if whole:
            self.tf = nn.Transformer(16, 4, 2, 2, 32, **kw)
        else:
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, **kw), 2,
                                             enable_nested_tensor=False)
            self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, **kw), 2)
        self.head = nn.Linear(16, 11)

    def forward(self, src, tgt, tgt_mask, src_pad):
        s, t = self.src_emb(src), self.tgt_emb(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        if self.whole:
            out = self.tf(s, t, tgt_mask=tgt_mask, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
        else:
            memory = self.enc(s, src_key_padding_mask=src_pad)
            out = self.dec(t, memory, tgt_mask=tgt_mask, memory_key_padding_mask=src_pad)
        return self.head(out if self.batch_first else out.transpose(0, 1))


def _seq2seq_inputs():
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    return (torch.randn(2, 7, 6, generator=g), torch.randint(0, 11, (2, 5), generator=g),
            nn.Transformer.generate_square_subsequent_mask(5), pad)


def test_decoder_graph_self_and_cross_attention_heads_and_ffn():
    g = DependencyGraph.build(Seq2Seq().eval(), _seq2seq_inputs())
    heads = {gr.members[0].module: gr for gr in g.groups if gr.kind == "heads"}
    assert sorted(heads) == ["dec.layers.0.multihead_attn", "dec.layers.0.self_attn", "dec.layers.1.multihead_attn",
                             "dec.layers.1.self_attn", "enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    cross = heads["dec.layers.1.multihead_attn"]
    assert cross.prunable and cross.size == 4 and {(m.module, m.axis, m.offset) for m in cross.members} == {
        ("dec.layers.1.multihead_attn", "out", 0), ("dec.layers.1.multihead_attn", "out", 16),
        ("dec.layers.1.multihead_attn", "out", 32), ("dec.layers.1.multihead_attn.out_proj", "in", 0)}
    (ffn,) = [gr for gr in g.groups if gr.members[0].module == "dec.layers.0.linear1"]
    assert ffn.prunable and {m.module for m in ffn.members} == {"dec.layers.0.linear1", "dec.layers.0.linear2"}
    for emb in ("src_emb", "tgt_emb"):       # the memory / target streams keep their width
        (stream,) = [gr for gr in g.groups if gr.members[0].module == emb]
        assert not stream.prunable and "LayerNorm" in stream.reason


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")   # nn.Transformer's own encoder fast path
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("whole,batch_first,norm_first", [(False, True, False), (True, False, True),
                                                          (True, True, False)])
def test_encoder_decoder_compacts_verifies_and_saves(tmp_path, whole, batch_first, norm_first):
    model = Seq2Seq(whole, batch_first, norm_first).eval()
    args = _seq2seq_inputs()
    pruner = sk.prune.Pruner(model, args, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    dec = small.tf.decoder if whole else small.dec
    for layer in dec.layers:
        for attn in (layer.self_attn, layer.multihead_attn):
            assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2 and attn.embed_dim == 16
        assert layer.linear1.out_features == 16
    assert _params(small) < 0.6 * _params(model)
    sk.verify(model, small, args, atol=1e-4)
    with torch.no_grad():                      # without verify's hooks too (torch's own fast paths)
        torch.testing.assert_close(small(*args), model(*args), atol=1e-4, rtol=0)
    sk.save(small, tmp_path / "s2s")
    back = sk.load(tmp_path / "s2s", Seq2Seq(whole, batch_first, norm_first))
    sk.verify(small, back.eval(), args, atol=0)


# ------------------------------------------------------------------- heads scored by data-dependent criteria
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.enc(self.inp(x))
        a, _ = self.mha(h, h, h)
        return self.fc(h + a).mean(1)


def _calib(pairs, n=3):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 6, 8, generator=g) for _ in range(n)]
    return [(x, torch.randint(0, 3, (4,), generator=g)) for x in xs] if pairs else xs


ATTENTION = ("enc.layers.0.self_attn", "enc.layers.1.self_attn", "mha")


@pytest.mark.parametrize("criterion", ["taylor", "mean_activation"])
def test_data_dependent_criteria_remove_heads(criterion):
    model = Encoder().eval()
    x = torch.randn(2, 6, 8)
    pruner = sk.prune.Pruner(model, x, criterion=criterion, granularity="channel", sparsity=0.5,
                             calib=_calib(criterion == "taylor"))
    scores = pruner.scores()
    assert all(scores[a].shape == (4,) and bool(scores[a].ne(scores[a][0]).any()) for a in ATTENTION)
    pruner.step()
    for a in ATTENTION:                          # two heads' q, k, v rows and out_proj columns masked
        assert model.get_submodule(a).out_proj.weight.eq(0).all(0).sum() == 8
    small = pruner.compact()
    for a in ATTENTION:
        assert isinstance(small.get_submodule(a), PrunedMultiheadAttention)
        assert small.get_submodule(a).num_heads == 2
    assert small.enc.layers[0].linear1.out_features == 16
    sk.verify(model, small, x, atol=1e-4)
    kept = torch.sort(torch.argsort(scores["mha"], descending=True)[:2]).values   # the best two heads stay
    assert small.mha.head_index.tolist() == kept.tolist()


@pytest.mark.parametrize("criterion", ["apoz", "entropy", "variance", "hrank", "hessian"])
def test_other_data_dependent_criteria_score_heads(criterion):
    model = Encoder().eval()
    x = torch.randn(2, 6, 8)
    pruner = sk.prune.Pruner(model, x, criterion=criterion, granularity="channel", sparsity=0.5,
                             calib=_calib(criterion == "hessian", n=2))
    pruner.step()
    small = pruner.compact()
    assert all(small.get_submodule(a).num_heads == 2 for a in ATTENTION)
    sk.verify(model, small, x, atol=1e-4)


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.fc(h + a).mean(1)


def _heads_out(model, x):
    """Per-head attention outputs before out_proj, ``[batch, heads, tokens, head_dim]``, computed by hand."""
    h = model.inp(x)
    q, k, v = F.linear(h, model.mha.in_proj_weight, model.mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(x.shape[0], -1, 4, 4).transpose(1, 2) for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v


def test_head_scores_are_the_gate_taylor_and_the_mean_head_output():
    model = MHANet().eval()
    x = torch.randn(2, 6, 8)
    pairs = _calib(True)
    got = sk.prune.Pruner(model, x, criterion="taylor", granularity="channel", calib=pairs).scores()["mha"]
    want = torch.zeros(4, dtype=torch.float64)
    for xb, yb in pairs:     # d loss / d gate_h = sum over the head's out_proj columns of W * dL/dW
        w = model.mha.out_proj.weight
        (gw,) = torch.autograd.grad(F.cross_entropy(model(xb), yb), [w])
        want += (w * gw).reshape(16, 4, 4).sum((0, 2)).double().square()
    torch.testing.assert_close(got.double(), want / len(pairs), rtol=1e-4, atol=1e-12)

    batches = _calib(False)
    got = sk.prune.Pruner(model, x, criterion="mean_activation", granularity="channel",
                          calib=batches).scores()["mha"]
    with torch.no_grad():
        want = torch.stack([_heads_out(model, xb) for xb in batches]).mean((0, 1, 3, 4))
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6)


def test_attention_path_gives_the_same_outputs_and_is_undone():
    model = Encoder().eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        want = model(x)
        with attention_path(model):
            assert all(not m._qkv_same_embed_dim for m in model.modules() if isinstance(m, nn.MultiheadAttention))
            got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            assert "forward" not in m.__dict__ and m._qkv_same_embed_dim


def test_heads_are_scored_from_data_only_under_group_selection():
    model = MHANet().eval()
    x = torch.randn(2, 6, 8)
    pruner = sk.prune.Pruner(model, x, criterion="mean_activation", granularity="channel", sparsity=0.5,
                             calib=_calib(False))
    assert pruner._tapped_heads() == ["mha"]
    with pytest.warns(UserWarning, match="mha_to_linear"):   # its in-projection is not an element layer
        element = sk.prune.Pruner(model, x, criterion="mean_activation", granularity="element", sparsity=0.5,
                                  calib=_calib(False))
    assert element._tapped_heads() == [] and "mha" not in element.scores()
