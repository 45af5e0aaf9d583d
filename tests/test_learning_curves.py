"""scripts/learning_curves.py: kNN against cumulative pretraining minutes, with the baselines as lines."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_curves", REPO / "scripts" / "learning_curves.py")
learning_curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning_curves)


def write_run(folder: Path, epochs: list[tuple[float, float | None]], init: float, pixels: float) -> Path:
    folder.mkdir(parents=True)
    records = [{"kind": "knn", "step": 0, "epoch": 0, "random_init_top1": init, "pixels_top1": pixels}]
    for e, (seconds, knn) in enumerate(epochs, 1):
        records.append({"kind": "train", "step": 10 * e, "epoch": e - 1, "loss": 1.0})
        records.append({"kind": "epoch", "step": 10 * e, "epoch": e, "loss": 1.0, "epoch_seconds": seconds,
                        **({"knn_top1": knn} if knn is not None else {})})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_minutes_add_up_over_epochs_and_only_epochs_with_knn_are_points(tmp_path):
    run = write_run(tmp_path / "a", [(60, None), (90, 0.4), (30, None), (120, 0.5)], 0.2, 0.3)
    minutes, knn, init, pixels = learning_curves.curve(run)
    assert minutes == [2.5, 5.0] and knn == [0.4, 0.5] and (init, pixels) == (0.2, 0.3)


def test_the_figure_and_the_table(tmp_path, capsys):
    a = write_run(tmp_path / "a", [(60, 0.4), (60, 0.5)], 0.2, 0.3)
    b = write_run(tmp_path / "b", [(120, 0.45)], 0.25, 0.3)
    out = tmp_path / "curves.png"
    assert learning_curves.main([f"scenes={a},{b}", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| scenes | a | 2.0 | 0.500 | 0.200 | 0.300 |" in printed and "| scenes | b | 2.0 | 0.450 | 0.250 |" in printed
