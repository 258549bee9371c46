"""Accuracy verification (evaluate), the layer sweep (cumulative / isolated, cached replay,
FP16 fallback) and their commands."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from torch_nvdla.calib.calibrate import calibrate
from torch_nvdla.calib.table import CalibrationTable, TapRange
from torch_nvdla.errors import CalibrationError
from torch_nvdla.model.batch import split_labels as split_batch
from torch_nvdla.sim.evaluate import accuracy, evaluate, spread_subset
from torch_nvdla.sim.simulate import int8_simulation
from torch_nvdla.sim.sweep import sweep
from torch_nvdla.zoo.data import batches


@pytest.fixture(scope="module")
def digits():
    from torch_nvdla.zoo.registry import get_dataset, get_model

    return get_model("digits-lenet"), get_dataset("digits")


@pytest.fixture(scope="module")
def digits_table(digits):
    model, data = digits
    return calibrate(model, data.loader("calibration", 100), "entropy", progress=False)


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------


def test_evaluate_reports_fp32_and_int8_per_strategy(digits):
    model, data = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = evaluate(model, data.loader("calibration", 100), data.loader("evaluation", 100), progress=False,
                      model_name="digits-lenet", data_name="digits")
    assert report.calibration_images == 200 and report.evaluation_images == 397
    assert [(r.method, r.simulation) for r in report.rows] == [
        ("", "fp32"), ("entropy", "fake"), ("entropy", "nvdla"), ("minmax", "fake"), ("minmax", "nvdla"),
        ("percentile", "fake"), ("percentile", "nvdla")]
    fp32 = report.fp32
    assert fp32.top1 > 95 and fp32.top5 >= fp32.top1
    for r in report.rows[1:]:
        assert abs(r.drop1 - (fp32.top1 - r.top1)) < 1e-9
        assert r.drop1 <= 2.0, r  # the embedded model loses little in INT8
    assert report.row("entropy", "nvdla").weights == "per-kernel"  # the compiler's default
    json.dumps(report.to_dict())
    report.print()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_evaluate_with_a_table_and_its_histograms(digits, digits_table):
    model, data = digits
    report = evaluate(model, digits_table, data.loader("evaluation", 100), methods=("entropy", "minmax"),
                      simulations=("nvdla",), weights="per-filter", progress=False)
    assert [(r.method, r.simulation, r.weights) for r in report.rows[1:]] == [
        ("entropy", "nvdla", "per-filter"), ("minmax", "nvdla", "per-filter")]
    loaded = CalibrationTable(dict(digits_table.items()), digits_table.infos, None, {"method": "entropy"})
    report = evaluate(model, loaded, data.loader("evaluation", 100), progress=False)
    assert {r.method for r in report.rows[1:]} == {"entropy"}
    assert any("no histograms" in n for n in report.notes)


def test_accuracy_counts_top1_and_top5():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([1, 1, 0])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    acc = accuracy(Fixed(), [(torch.zeros(3, 1), labels)])
    assert (acc.correct1, acc.correct5, acc.images) == (1, 2, 3)
    assert acc.top1 == pytest.approx(100 / 3) and acc.top5 == pytest.approx(200 / 3)


def test_unlabelled_or_overlapping_data_are_clear_errors(digits, digits_table):
    model, data = digits
    xs, ys = data.evaluation
    with pytest.raises(CalibrationError, match="labels"):
        evaluate(model, digits_table, [xs[:10]], progress=False)
    with pytest.raises(CalibrationError, match="no labels"):
        evaluate(model, digits_table, [(xs[:10],)], progress=False)
    with pytest.raises(CalibrationError, match="labels"):
        split_batch({"image": xs[:2]})
    with pytest.raises(CalibrationError, match="disjoint"):
        evaluate(model, data.loader("evaluation", 100), data.loader("evaluation", 100), methods=("minmax",),
                 simulations=("fake",), progress=False)
    with pytest.raises(CalibrationError, match="simulation"):
        evaluate(model, digits_table, data.loader("evaluation", 100), simulations=("int4",), progress=False)


def test_spread_subset_covers_the_split():
    x = torch.arange(100).float()
    y = torch.arange(100) // 10
    sx, sy = spread_subset(x, y, 10)
    assert sx.tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90] and set(sy.tolist()) == set(range(10))
    assert spread_subset(x, y, None)[0] is x


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------


def test_sweep_replay_equals_direct_evaluation(digits, digits_table):
    """The cached, partial recomputation gives exactly the full forward's accuracy."""
    model, data = digits
    ev = data.loader("evaluation", 100)
    for simulation in ("nvdla", "fake"):
        report = sweep(model, digits_table, ev, order="both", simulation=simulation, progress=False)
        assert report.layers == ("conv1", "pool1", "conv2", "pool2", "fc1", "fc2")
        with int8_simulation(model, digits_table, mode=simulation, placement="nvdla", layers=()) as sim:
            sim.set_layers(())
            assert accuracy(model, ev).top1 == pytest.approx(report.fp32, abs=1e-12)
            for row in report.isolated:
                sim.set_layers([row.layer])
                assert accuracy(model, ev).top1 == pytest.approx(row.accuracy, abs=1e-12), row
            for k, row in enumerate(report.cumulative):
                sim.set_layers(report.layers[: k + 1])
                assert accuracy(model, ev).top1 == pytest.approx(row.accuracy, abs=1e-12), row
        assert report.int8 == report.cumulative[-1].accuracy


class InPlaceBlock(nn.Module):
    """torchvision-style: functional in-place residual add, in-place ReLU called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        out = self.conv2(x)
        out += x
        out = self.relu(out)
        return self.fc(torch.flatten(out, 1))


def test_sweep_survives_in_place_ops_and_functional_adds(digits):
    _, data = digits
    torch.manual_seed(0)
    model = InPlaceBlock().eval()
    xs, ys = data.evaluation
    with torch.no_grad():  # labels = the model's own FP32 predictions, so FP32 is 100 %
        ys = model(xs).argmax(1)
    ev = list(batches(xs, ys, 100))
    table = calibrate(model, batches(*data.calibration, 100), "minmax", progress=False)
    report = sweep(model, table, ev, order="both", missing="fp32", progress=False)
    assert report.fp32 == 100.0
    with int8_simulation(model, table, mode="nvdla", layers=(), missing="fp32") as sim:
        for row in report.isolated:
            sim.set_layers([row.layer])
            assert accuracy(model, ev).top1 == pytest.approx(row.accuracy, abs=1e-12), row
        for k, row in enumerate(report.cumulative):
            sim.set_layers(report.layers[: k + 1])
            assert accuracy(model, ev).top1 == pytest.approx(row.accuracy, abs=1e-12), row


def test_sweep_finds_the_damaged_layer_and_a_fallback_within_budget(digits, digits_table):
    """A far too small range for the logits (written by fc2, read by no layer): fc2 is the
    sensitive layer and falling back on it meets the budget; the cumulative table only
    goes down from FP32."""
    model, data = digits
    ranges = dict(digits_table.items())
    ranges["fc2"] = TapRange("fc2", ranges["fc2"].amax / 30, "damaged")
    damaged = CalibrationTable(ranges, digits_table.infos, None, {"method": "damaged"})
    report = sweep(model, damaged, data.loader("evaluation", 100), order="both", budget=1.0, top_k=2,
                   progress=False)
    assert report.sensitive[0] == "fc2"
    assert report.isolated[-1].drop > 5.0 and report.fp32 - report.int8 > 5.0
    assert all(r.drop <= 1.0 for r in report.isolated[:-1])
    accs = [r.accuracy for r in report.cumulative]
    assert all(b <= a + 1.0 for a, b in zip([report.fp32] + accs, accs))  # monotone-looking
    assert accs[-1] == pytest.approx(report.int8)
    assert report.fallback_met and report.fallback == ("fc2",)
    assert report.fp32 - report.fallback_accuracy <= 1.0
    with int8_simulation(model, damaged, mode="nvdla", layers=()) as sim:
        sim.set_layers([n for n in report.layers if n not in report.fallback])
        assert accuracy(model, data.loader("evaluation", 100)).top1 == pytest.approx(report.fallback_accuracy)


def test_sweep_outputs_csv_json_png(tmp_path, digits, digits_table):
    model, data = digits
    report = sweep(model, digits_table, data.loader("evaluation", 200), order="isolated", budget=0.0,
                   progress=False)
    paths = report.save(tmp_path / "sweep")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["layer"] for r in rows] == list(report.layers) and {r["order"] for r in rows} == {"isolated"}
    obj = json.loads(paths["json"].read_text())
    assert obj["fp32"] == report.fp32 and obj["fallback"] == list(report.fallback)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.fallback_met  # budget 0: at worst everything falls back to FP32
    report.print()


def test_sweep_bad_options(digits, digits_table):
    model, data = digits
    ev = data.loader("evaluation", 100)
    with pytest.raises(CalibrationError, match="order"):
        sweep(model, digits_table, ev, order="random")
    with pytest.raises(CalibrationError, match="budget"):
        sweep(model, digits_table, ev, budget=-1)
    with pytest.raises(CalibrationError, match="calibration"):
        sweep(model, None, ev)
    with pytest.raises(CalibrationError, match="labels"):
        sweep(model, digits_table, [data.evaluation[0][:10]], progress=False)


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------


def test_cli_evaluate_json(capsys):
    from torch_nvdla.cli import main

    assert main(["evaluate", "--methods", "entropy", "--simulations", "fake,nvdla", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["model"] == "digits-lenet" and obj["evaluation_images"] == 397
    assert [r["simulation"] for r in obj["rows"]] == ["fp32", "fake", "nvdla"]


def test_cli_evaluate_plan_is_the_plan_the_simulation_ran(capsys, monkeypatch):
    """``--plan`` prints the NVDLA plan evaluate simulated; nothing is calibrated twice."""
    from torch_nvdla.calib import calibrate as calibrate_module
    from torch_nvdla.cli import main

    calls = []
    real = calibrate_module.calibrate
    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["evaluate", "--methods", "minmax", "--simulations", "nvdla", "--eval-images", "50", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "NVDLA simulation plan (minmax)" in out and "conv1" in out and len(calls) == 1
    assert main(["evaluate", "--methods", "minmax", "--simulations", "fake", "--eval-images", "50", "--plan"]) == 0
    assert "no NVDLA simulation ran" in capsys.readouterr().err


def test_cli_sweep_and_demo(tmp_path, capsys):
    from torch_nvdla.cli import main

    prefix = tmp_path / "sw"
    assert main(["sweep", "--order", "cumulative", "--images", "200", "--budget", "1", "-o", str(prefix)]) == 0
    assert (tmp_path / "sw.csv").exists() and (tmp_path / "sw.png").exists()
    out = tmp_path / "calib.json"
    assert main(["demo", "-o", str(out), "--no-progress"]) == 0
    calib = json.loads(out.read_text())
    assert list(calib)[0] == "data" and all(set(v) == {"scale", "min", "max", "offset"} for v in calib.values())
    # the Caffe export it belongs to, beside it: the same table, keyed by its prototxt's layers
    caffe = tmp_path / "digits_caffe"
    assert json.loads((caffe / "calib.json").read_text()) == calib
    assert (caffe / "deploy.prototxt").is_file() and (caffe / "model.caffemodel").is_file()
    assert "FP32" in capsys.readouterr().out


def test_evaluate_accepts_one_shot_iterators(digits):
    model, data = digits
    calib = iter(list(data.loader("calibration", 100)))
    ev = iter(list(data.loader("evaluation", 100)))
    report = evaluate(model, calib, ev, methods=("minmax",), simulations=("nvdla",), progress=False)
    assert report.calibration_images == 200 and report.rows[1].images == 397
