"""Recurrent models (CPU): dense vs hidden units pruned + compacted, sparsekit next to Torch-Pruning.

    python bench/bench_compact_rnn.py                 # sparsity 0.5, 15 interleaved samples per model
    python bench/bench_compact_rnn.py --sparsity 0.75 --reps 9

Models (batch ``--batch``, ``--steps`` time steps, float32, eval):

* speech-lstm   Linear 80 -> 512, 2-layer LSTM (hidden 1024), Linear 1024 -> 500 per frame (an acoustic model)
* tagger-bigru  Embedding 10000 x 256, 2-layer bidirectional GRU (hidden 512), Linear 1024 -> 20 per token
* lstm-1layer   Linear 80 -> 256, 1-layer LSTM (hidden 1024), Linear 1024 -> 10 on the last step

sparsekit: ``Pruner(criterion="l1", granularity="channel", scope="layer")`` removes ``--sparsity`` of every
prunable group (the recurrent hidden units, the input projection's outputs, the embedding's features), then
``compact()``; the compacted model is checked against the masked one with ``sk.verify`` (atol 1e-4). Torch-Pruning
(if installed): ``MagnitudePruner`` L1, pruning_ratio ``--sparsity``, the output Linear ignored; its result is
timed when it runs and the model still gives outputs of the original shape, else its error is recorded.
Dense and pruned models are timed interleaved in one loop (``sparsekit.timing``), medians.
Results: bench/results/compact_rnn_<machine>_<stamp>.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import sparsekit as sk
from sparsekit.benchmark.machine import script_results
from sparsekit.timing import interleaved_median_ms


class SpeechLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(80, 512)
        self.lstm = nn.LSTM(512, 1024, num_layers=2, batch_first=True)
        self.out = nn.Linear(1024, 500)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(torch.relu(self.inp(feats)))[0])


class TaggerBiGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10000, 256)
        self.gru = nn.GRU(256, 512, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(1024, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.emb(tokens))[0])


class LastStepLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(80, 256)
        self.lstm = nn.LSTM(256, 1024, batch_first=True)
        self.out = nn.Linear(1024, 10)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.inp(feats))[0][:, -1])


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int, torch.Generator], torch.Tensor]]] = {
    "speech-lstm": (SpeechLSTM, lambda b, t, g: torch.randn(b, t, 80, generator=g)),
    "tagger-bigru": (TaggerBiGRU, lambda b, t, g: torch.randint(0, 10000, (b, t), generator=g)),
    "lstm-1layer": (LastStepLSTM, lambda b, t, g: torch.randn(b, t, 80, generator=g)),
}


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def hidden(m: nn.Module) -> str:
    return ", ".join(f"{n} {r.hidden_size}" for n, r in m.named_modules() if isinstance(r, (nn.LSTM, nn.GRU, nn.RNN)))


def sk_compact(model: nn.Module, x: torch.Tensor, sparsity: float) -> nn.Module:
    masked = copy.deepcopy(model)
    pruner = sk.prune.Pruner(masked, (x,), criterion="l1", granularity="channel", sparsity=sparsity, scope="layer")
    pruner.step()
    small = pruner.compact().eval()
    sk.verify(masked.eval(), small, (x,), atol=1e-4)
    return small


def tp_compact(model: nn.Module, x: torch.Tensor, sparsity: float) -> tuple[nn.Module | None, str]:
    try:
        import torch_pruning as tp
    except ImportError:
        return None, "torch-pruning not installed"
    m = copy.deepcopy(model)
    try:
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=sparsity, ignored_layers=[m.out])
        pruner.step()
        with torch.no_grad():
            y = m(x)
    except Exception as e:     # noqa: BLE001 -- what Torch-Pruning does with the model is the result
        return None, f"failed: {type(e).__name__}: {str(e)[:120] or '(no message)'}"
    with torch.no_grad():
        if y.shape != model(x).shape:
            return None, f"output shape {tuple(y.shape)} differs from the dense {tuple(model(x).shape)}"
    return m.eval(), f"ran ({hidden(m)})"


def run(names: list[str], batch: int, steps: int, sparsity: float, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in names:
        make, data = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        x = data(batch, steps, gen)
        small = sk_compact(model, data(2, 5, gen), sparsity)
        tp_model, tp_note = tp_compact(model, data(2, 5, gen), sparsity)
        fns = {"dense": lambda m=model, x=x: m(x), "sparsekit": lambda m=small, x=x: m(x)}
        if tp_model is not None:
            fns["torch-pruning"] = lambda m=tp_model, x=x: m(x)
        with torch.no_grad():
            ms = interleaved_median_ms(fns, warmup=2, reps=reps)
        rows.append({"model": name, "batch": batch, "steps": steps, "sparsity": sparsity,
                     "dense_ms": ms["dense"], "sparsekit_ms": ms["sparsekit"],
                     "speedup": ms["dense"] / ms["sparsekit"], "dense_params": params(model),
                     "sparsekit_params": params(small), "dense_hidden": hidden(model),
                     "sparsekit_hidden": hidden(small),
                     "torch_pruning": tp_note,
                     "torch_pruning_speedup": ms["dense"] / ms["torch-pruning"] if "torch-pruning" in ms else None})
        print(f"{name}: dense {ms['dense']:.1f} ms, sparsekit {ms['sparsekit']:.1f} ms "
              f"({rows[-1]['speedup']:.2f}x); Torch-Pruning {tp_note}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.reps < 1:
        raise SystemExit("--batch, --steps and --reps must be >= 1")
    if not 0 < a.sparsity < 1:
        raise SystemExit(f"--sparsity must be in (0, 1), got {a.sparsity}")
    rows = run(a.models, a.batch, a.steps, a.sparsity, a.reps)
    base, info, stamp, where = script_results(a.out, "compact_rnn", "cpu")
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "reps": a.reps, "rows": rows}, indent=1,
                                                    default=str))
    lines = [f"# Recurrent models, hidden units pruned and compacted ({where}, float32, torch {torch.__version__}, "
             f"{stamp} UTC)", "",
             f"Batch {a.batch}, {a.steps} steps, {a.sparsity:.0%} of every group's units removed (L1, layer-wise); "
             f"medians of {a.reps} interleaved samples.", "",
             "| model | hidden (dense -> sparsekit) | params (dense -> sparsekit) | dense ms | sparsekit ms | "
             "speedup | Torch-Pruning |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tp_cell = r["torch_pruning"] + (f", {r['torch_pruning_speedup']:.2f}x" if r["torch_pruning_speedup"] else "")
        lines.append(f"| {r['model']} | {r['dense_hidden']} -> {r['sparsekit_hidden']} | "
                     f"{r['dense_params'] / 1e6:.2f}M -> {r['sparsekit_params'] / 1e6:.2f}M | {r['dense_ms']:.1f} | "
                     f"{r['sparsekit_ms']:.1f} | {r['speedup']:.2f}x | {tp_cell} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {base}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
