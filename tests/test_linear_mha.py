"""nn.MultiheadAttention with Linear projections: LinearMultiheadAttention, mha_to_linear, and what uses them
(pruning the q / k / v projections, sparsify, convert_modules, save / load, the encoder's fused path)."""

import itertools
import warnings

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.nn import LinearMultiheadAttention, SparseLinear, convert_modules, mha_to_linear
from sparsekit.prune.masks import apply_tensor_mask, remove_masks

E, H = 16, 4


def _inputs(batch_first: bool, kdim: int | None, batched: bool = True):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 5, E, generator=g), torch.randn(2, 7, kdim or E, generator=g))
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    return (q, k) if batched else (q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0])


@pytest.mark.parametrize("batch_first,kdim,bias,bias_kv,zero_attn",
                         list(itertools.product([False, True], [None, 12], [True, False], [False, True],
                                                [False, True])))
def test_same_outputs_as_stock(batch_first, kdim, bias, bias_kv, zero_attn):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim,
                                vdim=kdim, batch_first=batch_first).eval()
    lin = LinearMultiheadAttention.from_module(mha)
    assert isinstance(lin.q_proj, nn.Linear) and lin.out_proj is mha.out_proj
    q, k = _inputs(batch_first, kdim)
    calls = [(q, k, k)] + ([(q, q, q)] if kdim is None else [])
    for args, need_weights in itertools.product(calls, [True, False]):
        a, wa = mha(*args, need_weights=need_weights)
        b, wb = lin(*args, need_weights=need_weights)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-5)


def test_masks_unbatched_and_causal():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    lin = LinearMultiheadAttention.from_module(mha)
    q, _ = _inputs(True, None)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    per_head = torch.randn(2 * H, 5, 5)
    for kw in [dict(attn_mask=causal, is_causal=True, need_weights=False), dict(key_padding_mask=padding),
               dict(attn_mask=per_head), dict(attn_mask=causal, average_attn_weights=False)]:
        a, wa = mha(q, q, q, **kw)
        b, wb = lin(q, q, q, **kw)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        if wa is not None:
            torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-5)
    uq, _ = _inputs(True, None, batched=False)
    torch.testing.assert_close(lin(uq, uq, uq)[0], mha(uq, uq, uq)[0], atol=1e-5, rtol=1e-5)


def test_from_compacted_heads_and_from_masks():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    from sparsekit.prune.pruned_mha import PrunedMultiheadAttention

    pruned = PrunedMultiheadAttention.from_module(mha, torch.tensor([0, 2]))
    lin = LinearMultiheadAttention.from_module(pruned)
    assert (lin.num_heads, lin.orig_heads, lin.head_index.tolist()) == (2, 4, [0, 2])
    q, _ = _inputs(True, None)
    torch.testing.assert_close(lin(q, q, q)[0], pruned(q, q, q)[0], atol=1e-5, rtol=1e-5)

    original = mha.in_proj_weight.detach().clone()
    mask = torch.rand(3 * E, E, generator=torch.Generator().manual_seed(3)) > 0.5
    apply_tensor_mask(mha, "in_proj_weight", mask)
    lin = LinearMultiheadAttention.from_module(mha)
    torch.testing.assert_close(lin(q, q, q)[0], mha(q, q, q)[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(lin.k_proj.weight == 0, ~mask[E:2 * E] | (original[E:2 * E] == 0))
    remove_masks(lin)   # un-pruning the copy gives back the values the masks hid
    torch.testing.assert_close(torch.cat([lin.q_proj.weight, lin.k_proj.weight, lin.v_proj.weight]), original)


def test_from_module_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        LinearMultiheadAttention.from_module(nn.Linear(4, 4))


def _encoder(norm_first: bool = False) -> nn.Module:
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_mha_to_linear_encoder_eval_paths(norm_first):
    enc = _encoder(norm_first)
    x = torch.randn(2, 6, E)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    conv = mha_to_linear(enc)
    assert conv is not enc and isinstance(enc.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(conv.layers[1].self_attn, LinearMultiheadAttention)
    assert not conv.layers[0].activation_relu_or_gelu and not conv.use_nested_tensor
    with torch.no_grad():    # the fused eval kernels and the nested-tensor path are what the stock model runs
        torch.testing.assert_close(conv(x), enc(x), atol=1e-5, rtol=1e-5)
        ref, got = enc(x, src_key_padding_mask=padding), conv(x, src_key_padding_mask=padding)
    # (the nested path leaves padded positions at 0; compare the real ones)
    torch.testing.assert_close(got[~padding], ref[~padding], atol=1e-5, rtol=1e-5)


def test_pruner_warns_about_stock_in_projections_and_prunes_converted_ones():
    enc = _encoder()
    x = torch.randn(2, 6, E)
    with pytest.warns(UserWarning, match="mha_to_linear"):
        sk.prune.Pruner(enc, x, granularity="element", sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.prune.Pruner(enc, x, granularity="channel", sparsity=0.5)     # heads are pruned as channels
        attention = ["layers.0.self_attn", "layers.1.self_attn"]
        sk.prune.Pruner(enc, x, granularity="element", sparsity=0.5, ignore=attention)
        conv = mha_to_linear(enc)
        pruner = sk.prune.Pruner(conv, x, granularity="element", sparsity=0.5)
    pruner.step()
    for proj in ("q_proj", "k_proj", "v_proj"):
        w = conv.get_submodule(f"layers.0.self_attn.{proj}").weight
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


def _block_pruned_encoder(attention: bool, mlp: bool) -> nn.Module:
    """Stock encoder whose attention projections and / or MLP hold 50% zero 4x4 blocks."""
    enc = _encoder()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            is_attn = "self_attn" in name
            if p.dim() == 2 and ((attention and is_attn) or (mlp and not is_attn)):
                keep = torch.rand(p.shape[0] // 4, p.shape[1] // 4, generator=g) > 0.5
                p.mul_(keep.repeat_interleave(4, 0).repeat_interleave(4, 1))
    return enc


def test_sparsify_reaches_attention_projections(tmp_path):
    enc = _block_pruned_encoder(attention=True, mlp=True)
    x = torch.randn(2, 6, E)
    fast, report = sk.sparsify(enc, x, formats=("bsr",), blocks=((4, 4),), min_speedup=1e-9, cache=False)
    attn = fast.layers[0].self_attn
    assert isinstance(attn, LinearMultiheadAttention)
    assert all(isinstance(getattr(attn, p), SparseLinear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert {f"layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")} <= {d.name for d in report.layers}
    sk.verify(enc, fast, x, atol=1e-4)
    sk.verify(enc, torch.compile(fast, fullgraph=True, backend="eager"), x, atol=1e-4)
    sk.save(fast, tmp_path)
    loaded = sk.load(tmp_path, _encoder())
    assert isinstance(loaded.layers[1].self_attn.v_proj, SparseLinear)
    sk.verify(fast, loaded, x, atol=0)
    with torch.device("meta"):
        skeleton = _encoder()
    sk.verify(fast, sk.load(tmp_path, skeleton), x, atol=0)


def test_sparsify_keeps_stock_attention_when_nothing_beats_dense():
    enc = _block_pruned_encoder(attention=True, mlp=False)
    x = torch.randn(2, 6, E)
    fast, report = sk.sparsify(enc, x, formats=("bsr",), blocks=((4, 4),), min_speedup=1e9, cache=False)
    assert type(fast.layers[0].self_attn) is nn.MultiheadAttention
    assert fast.layers[0].activation_relu_or_gelu     # nothing replaced: the fused path stays
    notes = [n for d in report.layers if d.name.startswith("layers.0.self_attn.") for n in d.notes]
    assert any("stays an nn.MultiheadAttention" in n for n in notes)
    sk.verify(enc, fast, x, atol=1e-4)


def test_sparse_mlp_under_stock_attention_runs_in_eval():
    """A SparseLinear in linear1 / linear2 must turn the encoder's fused eval path off: it reads their weights."""
    enc = _block_pruned_encoder(attention=False, mlp=True)
    x = torch.randn(2, 6, E)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    fast, _ = sk.sparsify(enc, x, formats=("bsr",), blocks=((4, 4),), min_speedup=1e-9, cache=False)
    assert isinstance(fast.layers[0].linear1, SparseLinear)
    assert type(fast.layers[0].self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        sk.verify(enc, fast, x, atol=1e-4)
        ref, got = enc(x, src_key_padding_mask=padding), fast(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got[~padding], ref[~padding], atol=1e-4, rtol=1e-4)
    by_hand = convert_modules(_block_pruned_encoder(attention=False, mlp=True), format="bsr", block=4)
    with torch.no_grad():
        sk.verify(enc, by_hand, x, atol=1e-4)


def test_convert_modules_converts_attention_with_zeros():
    enc = _block_pruned_encoder(attention=True, mlp=False)
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        ref = enc(x)
    fast = convert_modules(enc, format="bsr", block=4)
    assert isinstance(fast.layers[0].self_attn.q_proj, SparseLinear)
    assert fast.sparsekit_skipped["layers.0.linear1"] == "no zeros"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, atol=1e-4, rtol=1e-4)


def test_compacted_heads_then_linear_save_load(tmp_path):
    enc = _encoder()
    x = torch.randn(2, 6, E)
    pruner = sk.prune.Pruner(enc, x, criterion="l1", granularity="channel", sparsity=0.5, ignore=[])
    pruner.step()
    small = mha_to_linear(pruner.compact())
    attn = small.layers[0].self_attn
    assert isinstance(attn, LinearMultiheadAttention) and attn.num_heads < attn.orig_heads
    sk.verify(enc, small, x, atol=1e-4)
    sk.save(small, tmp_path)
    sk.verify(small, sk.load(tmp_path, _encoder()), x, atol=0)


def test_sparsify_transformer_with_cross_attention(tmp_path):
    torch.manual_seed(6)
    model = nn.Transformer(E, H, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                keep = torch.rand(p.shape[0] // 4, p.shape[1] // 4, generator=g) > 0.5
                p.mul_(keep.repeat_interleave(4, 0).repeat_interleave(4, 1))
    src, tgt = torch.randn(2, 6, E), torch.randn(2, 5, E)
    fast, report = sk.sparsify(model, (src, tgt), formats=("bsr",), blocks=((4, 4),), min_speedup=1e-9, cache=False)
    cross = fast.decoder.layers[0].multihead_attn
    assert isinstance(cross, LinearMultiheadAttention) and isinstance(cross.k_proj, SparseLinear)
    assert len(report.layers) == 16     # 3 attentions x 4 projections + 2 feed-forwards x 2
    sk.verify(model, fast, (src, tgt), atol=1e-4)
    sk.save(fast, tmp_path)
    fresh = nn.Transformer(E, H, 1, 1, 32, dropout=0.0, batch_first=True)
    sk.verify(fast, sk.load(tmp_path, fresh), (src, tgt), atol=0)


class _AttnNet(nn.Module):
    def __init__(self, **mha_kw):
        super().__init__()
        self.inp = nn.Linear(8, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, **mha_kw)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.attn(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("criterion", ["l1", "mean_activation", "taylor"])
def test_channel_pruning_removes_heads_after_conversion(criterion, tmp_path):
    torch.manual_seed(8)
    model = mha_to_linear(_AttnNet().eval())
    x = torch.randn(2, 5, 8)
    calib = [(x, torch.tensor([0, 2]))] if criterion == "taylor" else [x]
    pruner = sk.prune.Pruner(model, x, criterion=criterion, granularity="channel", sparsity=0.5, calib=calib)
    pruner.step()
    small = pruner.compact()
    attn = small.attn
    assert isinstance(attn, LinearMultiheadAttention) and attn.num_heads == 2 and attn.orig_heads == H
    assert attn.q_proj.out_features == attn.out_proj.in_features == 2 * (E // H)
    assert len(set(attn.head_index.tolist())) == 2
    sk.verify(model, small, x, atol=1e-4)           # the compacted model is the (head-)masked one
    sk.save(small, tmp_path)
    sk.verify(small, sk.load(tmp_path, _AttnNet()), x, atol=0)


def test_heads_with_bias_kv_stay_whole_after_conversion():
    from sparsekit.prune.graph import DependencyGraph

    model = mha_to_linear(_AttnNet(add_bias_kv=True).eval())
    graph = DependencyGraph.build(model, torch.randn(2, 5, 8))
    (heads,) = [g for g in graph.groups if g.kind == "heads"]
    assert not heads.prunable and "add_bias_kv" in heads.reason


class _Padded(nn.Module):
    """A stock encoder called with a padding mask (its nested-tensor path on)."""

    def __init__(self):
        super().__init__()
        self.enc = _encoder()

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("attention", [True, False])
def test_sparsify_with_a_padding_mask_in_the_example_inputs(attention):
    model = _Padded().eval()
    model.enc = _block_pruned_encoder(attention=attention, mlp=True)
    assert model.enc.use_nested_tensor
    x, pad = torch.randn(2, 6, E), torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    fast, report = sk.sparsify(model, (x, pad), formats=("bsr",), blocks=((4, 4),), min_speedup=1e-9, cache=False)
    assert isinstance(fast.enc.layers[0].linear1, SparseLinear) and not fast.enc.use_nested_tensor
    assert model.enc.use_nested_tensor          # the user's model is untouched
    with torch.no_grad():
        ref, got = model(x, pad), fast(x, pad)
    torch.testing.assert_close(got[~pad], ref[~pad], atol=1e-4, rtol=1e-4)


def test_sparsify_keeps_the_fused_path_of_a_masked_stock_attention():
    enc = _encoder()
    heads = torch.ones(3 * E, E, dtype=torch.bool)
    heads[:E // H] = False                      # one head's query rows masked: zeros, no layer converts
    apply_tensor_mask(enc.layers[0].self_attn, "in_proj_weight", heads)
    fast, _ = sk.sparsify(enc, torch.randn(2, 6, E), min_speedup=1e9, cache=False)
    assert type(fast.layers[0].self_attn) is nn.MultiheadAttention
    assert fast.layers[0].activation_relu_or_gelu and fast.layers[1].activation_relu_or_gelu


def test_convert_modules_leaves_attention_subclasses_alone():
    class MyMHA(nn.MultiheadAttention):
        def forward(self, q, k, v, **kw):
            return super().forward(q, k, v, **kw)

    net = _AttnNet()
    net.attn = MyMHA(E, H, batch_first=True)
    with torch.no_grad():
        net.attn.out_proj.weight[:, :4] = 0
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = net(x)
    fast = convert_modules(net, format="csr")
    assert type(fast.attn) is MyMHA and type(fast.attn.out_proj) is not SparseLinear
    assert "inside nn.MultiheadAttention" in fast.sparsekit_skipped["attn.out_proj"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref)


def test_restored_attention_is_reported_under_its_own_tensor_and_flags_stay():
    enc = _block_pruned_encoder(attention=True, mlp=False)
    enc.layers[0].self_attn.out_proj.weight.requires_grad_(False)
    fast = convert_modules(enc, format="bsr", block=5)          # 5 divides nothing here: nothing converts
    attn = fast.layers[0].self_attn
    assert type(attn) is nn.MultiheadAttention and not attn.out_proj.weight.requires_grad
    assert attn.in_proj_weight.requires_grad
    assert "q_proj" in fast.sparsekit_skipped["layers.0.self_attn.in_proj_weight"]
    assert not any(k.endswith(("q_proj", "k_proj", "v_proj")) for k in fast.sparsekit_skipped)


def test_constructor_and_conversion_errors():
    lin = LinearMultiheadAttention(E, H, 0.1, batch_first=True)
    assert (lin.head_dim, lin.dropout, lin.q_proj.out_features) == (E // H, 0.1, E) and not lin.q_proj.bias.any()
    with pytest.raises(ValueError, match="num_heads must divide"):
        LinearMultiheadAttention(E, 3)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        LinearMultiheadAttention(E, H, head_dim=0)
    with pytest.raises(ValueError, match="itself an attention module"):
        mha_to_linear(nn.MultiheadAttention(E, H), inplace=True)


def test_load_into_a_converted_skeleton(tmp_path):
    model = mha_to_linear(_AttnNet().eval())
    with torch.no_grad():
        model.attn.q_proj.weight[:8] = 0
    x = torch.randn(2, 5, 8)
    fast, _ = sk.sparsify(model, x, formats=("csr",), min_speedup=1e-9, cache=False)
    sk.save(fast, tmp_path / "a")
    sk.verify(fast, sk.load(tmp_path / "a", mha_to_linear(_AttnNet())), x, atol=0)
    pruner = sk.prune.Pruner(_AttnNet().eval(), x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = mha_to_linear(pruner.compact())
    sk.save(small, tmp_path / "b")      # heads removed: the converted skeleton is resized to them
    sk.verify(small, sk.load(tmp_path / "b", mha_to_linear(_AttnNet())), x, atol=0)


def test_a_converted_attention_not_faster_than_the_stock_one_is_put_back():
    """sparsify times the converted attention (sparse projections) against the stock module on its real call;
    here the threshold cannot be met, so the stock module and dense decisions come back."""
    from sparsekit.sparsify import LayerDecision, SparsifyReport, _keep_faster_converted

    net = _AttnNet().eval()
    original = net.attn
    with torch.no_grad():
        original.out_proj.weight[:, :8] = 0
    net.attn = LinearMultiheadAttention.from_module(original)
    net.attn.out_proj = SparseLinear.from_dense(net.attn.out_proj, format="csr")
    h = torch.randn(2, 5, E)
    decision = LayerDecision("attn.out_proj", "linear", (E, E), (10, E), 0.5, "unstructured",
                             {"dense": 1.0, "csr": 0.5}, "csr", 2.0, backend="sparsekit_cpu")
    report = SparsifyReport([decision], "cpu", "torch.float32", min_speedup=1e9)
    exposed = {"attn": original}
    _keep_faster_converted(net, exposed, {"attn": ((h, h, h), {"need_weights": False})}, report, 3,
                           torch.device("cpu"))
    assert net.attn is original and exposed == {}
    assert (decision.choice, decision.speedup, decision.backend) == ("dense", 1.0, "torch")
    assert "it stays stock" in decision.notes[-1]


@pytest.mark.parametrize("criterion", ["mean_activation", "apoz", "taylor", "l1"])
def test_converted_heads_are_scored_as_the_stock_ones(criterion):
    """Data-dependent criteria score the heads of a LinearMultiheadAttention from the heads' outputs / gates, as
    for the stock module, so both keep the same heads."""
    torch.manual_seed(9)
    stock = _AttnNet().eval()
    x = torch.randn(4, 5, 8)
    calib = [(x, torch.tensor([0, 2, 1, 1]))] if criterion == "taylor" else [x]
    kept = []
    for model in (stock, mha_to_linear(stock)):
        pruner = sk.prune.Pruner(model, x, criterion=criterion, granularity="channel", sparsity=0.5, calib=calib,
                                 ignore=["inp", "fc"])
        pruner.step()
        kept.append(pruner.compact().attn.head_index.tolist())
    assert kept[0] == kept[1] and len(kept[0]) == 2


def test_ignoring_out_proj_keeps_converted_heads_whole():
    model = mha_to_linear(_AttnNet().eval())
    x = torch.randn(2, 5, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5,
                             ignore=["attn.out_proj", "fc"])
    pruner.step()
    assert pruner.compact().attn.num_heads == H


def test_compacted_head_index_serves_per_head_masks_and_unused_attention():
    """head_index names the heads kept: a 3-D attn_mask given per original head still lines up after
    compaction; an attention the forward never calls is left as it is."""
    class Masked(_AttnNet):
        def __init__(self):
            super().__init__()
            self.unused = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, mask):
            h = self.inp(x)
            return self.fc(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0].mean(1))

    torch.manual_seed(10)
    model = mha_to_linear(Masked().eval())
    x = torch.randn(2, 5, 8)
    mask = torch.randn(2 * H, 5, 5)                   # a different additive mask per (sample, head)
    pruner = sk.prune.Pruner(model, (x, mask), criterion="l1", granularity="channel", sparsity=0.5,
                             ignore=["inp", "fc", "unused"])
    pruner.step()
    small = pruner.compact()
    assert small.attn.num_heads == 2 and small.attn.head_index.tolist() != [0, 1]   # (else the check is void)
    sk.verify(model, small, (x, mask), atol=1e-4)
    assert isinstance(small.unused, LinearMultiheadAttention) and small.unused.num_heads == H


def test_native_linear_attention_compacts_and_loads(tmp_path):
    class Native(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.fc = nn.Linear(8, E), LinearMultiheadAttention(E, H, batch_first=True), \
                nn.Linear(E, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.fc(self.attn(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(11)
    model = Native().eval()
    x = torch.randn(2, 5, 8)
    pruner = sk.prune.Pruner(model, x, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()
    small = pruner.compact()
    assert small.attn.num_heads == 2
    sk.verify(model, small, x, atol=1e-4)
    sk.save(small, tmp_path)
    sk.verify(small, sk.load(tmp_path, Native()), x, atol=0)


def test_a_hand_placed_sparse_linear_runs_with_the_fused_path_on_or_off():
    """torch's fused eval kernel reads linear1.weight: a SparseLinear's weight view carries __torch_function__, so
    torch's own check steps aside to the module path (it read a missing attribute before the view)."""
    enc = _block_pruned_encoder(attention=False, mlp=True)
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        ref = enc(x)
    enc.layers[0].linear1 = SparseLinear.from_dense(enc.layers[0].linear1, format="bsr", block=4)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref, atol=1e-4, rtol=1e-4)
    assert sk.nn.disable_fused_transformer_paths(enc) == 1
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.nn.disable_fused_transformer_paths("encoder")
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref, atol=1e-4, rtol=1e-4)


def test_inplace_sparsify_that_cannot_run_leaves_the_model_as_it_was():
    model = _Padded().eval()
    model.enc = _block_pruned_encoder(attention=True, mlp=False)
    with pytest.raises(ValueError, match="example_inputs: the model failed to run"):
        sk.sparsify(model, (torch.randn(2, 6, E + 1), None), inplace=True, cache=False)
    assert type(model.enc.layers[0].self_attn) is nn.MultiheadAttention and model.enc.use_nested_tensor


def test_fpgm_scores_packed_q_k_v_as_three_layers():
    """A stock attention's packed in_proj_weight is scored as its q, k and v Linears (as after the conversion),
    so a row-comparing criterion keeps the same heads for both."""
    torch.manual_seed(12)
    stock = _AttnNet().eval()
    with torch.no_grad():
        stock.attn.in_proj_weight[:E] *= 5.0          # q rows far larger than k / v rows
    x = torch.randn(2, 5, 8)
    kept = []
    for model in (stock, mha_to_linear(stock)):
        pruner = sk.prune.Pruner(model, x, criterion="fpgm", granularity="channel", sparsity=0.5,
                                 ignore=["inp", "fc"])
        pruner.step()
        kept.append(pruner.compact().attn.head_index.tolist())
    assert kept[0] == kept[1]


def test_iterative_data_dependent_pruning_of_stock_attention():
    """The second step reads masked in-projections outside any leaf module: their mask computation must not be
    recorded as steps of the forward pass (it shifted the calibration events before)."""
    model = sk.models.VisionTransformer(dim=32, heads=4, mlp=64, layers=2).eval()
    x = model.example_input(4)
    pruner = sk.prune.Pruner(model, x, criterion="mean_activation", granularity="channel", sparsity=0.5, calib=[x],
                             schedule=sk.prune.Iterative(steps=2))
    pruner.step()
    pruner.step()
    sk.verify(model, pruner.compact(), x, atol=1e-4)


def test_sparsify_restores_attention_on_any_error():
    class Broken(_AttnNet):
        def forward(self, x):
            super().forward(x)
            raise KeyError("boom")

    model = Broken().eval()
    with torch.no_grad():
        model.attn.in_proj_weight[:8] = 0
    with pytest.raises(KeyError):
        sk.sparsify(model, torch.randn(2, 5, 8), inplace=True, cache=False)
    assert type(model.attn) is nn.MultiheadAttention
