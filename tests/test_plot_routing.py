"""scripts/plot_routing.py on a small synthetic run directory."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_routing.py"
PNGS = ("expert_load.png", "expert_load_over_steps.png", "load_cv.png", "loss.png")


@pytest.fixture(scope="module")
def plot_routing():
    spec = importlib.util.spec_from_file_location("plot_routing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run: Path, steps: int = 12, layers: int = 3, experts: int = 8) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("model:\n  moe:\n    first_dense_layers: 1\n")
    metrics, routing = [], []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 9.0 - 0.3 * s, "aux_loss": 0.03 + 0.001 * s, "z_loss": 0.01,
               "load_cv": 0.5}
        if s % 6 == 0:
            rec["val_loss"] = rec["loss"] + 0.1
        metrics.append(json.dumps(rec))
        layer_recs = []
        for i in range(layers):
            counts = [(s + i * e) % 7 + (40 if e == i else 1) for e in range(experts)]
            mean = sum(counts) / experts
            cv = (sum((c - mean) ** 2 for c in counts) / experts) ** 0.5 / mean
            layer_recs.append({"tokens_per_expert": counts, "load_cv": cv,
                               "max_load_ratio": max(counts) / mean, "dropped_frac": 0.0,
                               "entropy": 2.0, "lbl": 1.0})
        routing.append(json.dumps({"step": s, "layers": layer_recs}))
    # A resumed run logs step 12 again (the last one wins); a crash leaves half a line.
    routing.append(routing[-1])
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    (run / "routing.jsonl").write_text("\n".join(routing) + '\n{"step": 13, "lay')
    return run


def test_writes_every_png(plot_routing, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run")
    assert plot_routing.main([str(run), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    for name in PNGS:
        path = tmp_path / "plots" / name
        assert str(path) in printed
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PNGS)


def test_reading_the_run_files(plot_routing, tmp_path):
    run = write_run(tmp_path / "run", steps=5)
    routing = plot_routing.read_jsonl(run / "routing.jsonl")
    assert [r["step"] for r in routing] == [1, 2, 3, 4, 5]  # duplicate merged, broken line skipped
    steps, shares = plot_routing.load_shares(routing)
    assert shares.shape == (5, 3, 8) and list(steps) == [1, 2, 3, 4, 5]
    assert shares.sum(axis=2) == pytest.approx(1.0)
    assert shares[0, 1].argmax() == 1  # layer i overloads expert i
    assert plot_routing.first_moe_block(run) == 1
    bins, binned = plot_routing.bin_steps(steps, shares, max_columns=2)
    assert list(bins) == [1, 3] and binned[0] == pytest.approx(shares[:2].mean(axis=0))


def test_errors(plot_routing, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot_routing.main([str(tmp_path / "empty")]) == 2
    assert "no readable metrics.jsonl or routing.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plot_routing.main([str(write_run(tmp_path / "run"))]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "moetrain[plot]" in err
