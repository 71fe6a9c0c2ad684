"""The `sparsekit` command line: every subcommand's --help, bad arguments answered by argparse (no traceback),
`sparsekit sparsify` on a sparsekit.save directory."""

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit.cli import build_parser, main
from sparsekit.nn import SparseLinear

SUBCOMMANDS = [[], ["info"], ["demo"], ["bench"], ["bench", "kernels"], ["bench", "model"], ["report"], ["sparsify"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "sparsekit")
def test_every_subcommand_prints_its_help(words, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*words, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: sparsekit")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--formats", "coo"], "--formats"),
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--min-speedup", "-1"], "--min-speedup"),
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--min-speedup", "nan"], "--min-speedup"),
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--model-kwargs", "{bad"], "--model-kwargs"),
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--model-kwargs", "[1]"], "--model-kwargs"),
        (["sparsify", "w.safetensors", "--model", "ffn", "--out", "o", "--batch", "0"], "--batch"),
        (["demo", "--min-speedup", "0"], "--min-speedup"),
        (["demo", "--formats", "dense,coo"], "--formats"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_sparsify_command_measures_a_saved_sparse_model_again(tmp_path, capsys):
    """A sparsekit.save directory is re-measured on this machine (here: forced to csr), not passed through."""
    torch.manual_seed(0)
    model = sk.models.FFN(dim=64, hidden=128, tokens=4).eval()
    x = model.example_input(2)
    sk.prune.Pruner(model, x, criterion="magnitude", granularity="block", block=(16, 16), sparsity=0.8).step()
    fast, _ = sk.sparsify(model, x, formats=["dense", "bsr"], min_speedup=1e-9, cache=False, reps=2)
    sk.save(fast, tmp_path / "saved")
    kwargs = '{"dim": 64, "hidden": 128, "tokens": 4}'
    argv = ["sparsify", str(tmp_path / "saved"), "--model", "ffn", "--model-kwargs", kwargs, "--batch", "2"]
    assert main([*argv, "--formats", "dense,csr", "--min-speedup", "1e-9", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "fc2" in out and "saved to" in out
    loaded = sk.load(tmp_path / "out", sk.models.FFN(dim=64, hidden=128, tokens=4))
    assert isinstance(loaded.fc1, SparseLinear) and loaded.fc1.format == "csr" and loaded.fc2.format == "csr"
    torch.testing.assert_close(loaded(x), fast(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("words, reps", [
    (["--max-reps", "3"], (3, 3)),                   # only a maximum below the default minimum: the minimum follows
    (["--quick", "--max-reps", "2"], (2, 2)),
    (["--min-reps", "40"], (40, 40)),                # only a minimum above the default maximum: the maximum follows
    (["--min-reps", "2", "--max-reps", "4"], (2, 4)),
])
def test_bench_reps_options_are_honoured(words, reps):
    from sparsekit.benchmark.command import config_from_args

    args = build_parser().parse_args(["bench", "kernels", *words])
    cfg = config_from_args(args, "kernels", [])
    assert (cfg.min_reps, cfg.max_reps) == reps


def test_bench_refuses_non_finite_sample_and_budget_times(capsys):
    for flag in ("--min-sample-ms", "--budget"):
        for value in ("nan", "inf"):
            with pytest.raises(SystemExit) as exc:      # argparse's error or config_from_args's
                main(["bench", "kernels", flag, value, "--no-peaks", "--no-compile"])
            said = f"{exc.value} {capsys.readouterr().err}"
            assert "finite" in said or "> 0" in said, (flag, value, said)


def test_sparsify_command_example_input_follows_the_model():
    """--input-shape gives the batch itself (with --batch too it says so) and the input takes the model's dtype."""
    from sparsekit.sparsify_command import _example_input

    model = nn.Linear(8, 4).to(torch.bfloat16)
    x = _example_input(model, None, "3,8")
    assert x.shape == (3, 8) and x.dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="--batch and --input-shape"):
        _example_input(model, 2, "3,8")
    ffn = sk.models.FFN(dim=16, hidden=32, tokens=4).to(torch.bfloat16)
    assert _example_input(ffn, 5, None).dtype == torch.bfloat16 and _example_input(ffn, 5, None).shape[0] == 5

    class Pair(nn.Module):            # example_input gives a tuple: each floating tensor follows the model
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, ids):
            return self.a(x) + ids.float().unsqueeze(-1)

        def example_input(self, batch):
            return torch.randn(batch, 4), torch.arange(batch)

    x, ids = _example_input(Pair().to(torch.bfloat16), 3, None)
    assert x.dtype == torch.bfloat16 and ids.dtype == torch.int64


def test_sparsify_command_errors_name_the_option_and_json_stays_json(tmp_path, capsys, monkeypatch):
    import json

    model = sk.models.FFN(dim=16, hidden=32, tokens=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage" * 10)
    (tmp_path / "afile").write_text("")
    argv = ["sparsify", str(tmp_path / "w.pt"), "--model", "ffn", "--model-kwargs",
            '{"dim": 16, "hidden": 32, "tokens": 4}']
    with pytest.raises(SystemExit, match=r"--out .*afile.* is not a writable directory"):
        main([*argv, "--out", str(tmp_path / "afile")])
    with pytest.raises(SystemExit, match=r"did not run on the example input of shape \(2, 7\) \(--input-shape\)"):
        main([*argv, "--input-shape", "2,7", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="Unsupported operand.*damaged or not a torch.save file"):
        main(["sparsify", str(tmp_path / "junk.pt"), "--model", "ffn", "--out", str(tmp_path / "o")])
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main([*argv, "--batch", "2", "--json", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "layers" in json.loads(out.out) and "saved to" in out.err


def test_demo_option_errors_are_named_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="sparsekit demo: width must be a positive number"):
        main(["demo", "--width", "0"])
    with pytest.raises(SystemExit, match="--out .* is not a writable directory"):
        (tmp_path / "f").write_text("")
        main(["demo", "--out", str(tmp_path / "f")])
