"""``calibrate(model, loader)``: the calibration contract.

Tap naming (a module called three times), every loader shape, the model left exactly as it
was (modes, state, no hooks, also after an exception), error policies (empty loader,
unsupported batch, NaN, all-zero taps), the strategies' spellings, the calibration cache,
table files and histogram dumps, re-picking ranges without data, derived ReLU taps, and the
``torch-nvdla calibrate`` command line.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from torch_nvdla import (
    CalibrationError,
    CalibrationTable,
    FileFormatError,
    NonFiniteActivationError,
    TapSelection,
    calibrate,
    calibration_mode,
)


class Net(nn.Module):
    """conv/bn/relu, then one ``relu`` module called three times on different ranges."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.bias.fill_(1.0)  # positive side sets the range: relu reuses bn1
            self.conv2.bias.fill_(-0.5)  # negative side sets the range: relu#1 observed itself
            self.conv3.weight.mul_(10.0)
            self.conv3.bias.fill_(2.0)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


class KwNet(Net):
    """Takes its input by keyword (for dict batches)."""

    def forward(self, x=None, extra=None):
        assert extra is None or isinstance(extra, torch.Tensor)
        return super().forward(x)


class Counting(Net):
    """Counts forward calls."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class Other(nn.Module):
    """A different architecture (for the cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def _images(n: int = 4, batch: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _same_histograms(a: CalibrationTable, b: CalibrationTable) -> None:
    assert list(a.histograms) == list(b.histograms)
    for name in a.histograms:
        ha, hb = a.histograms[name], b.histograms[name]
        assert float(ha.range) == float(hb.range), name
        assert torch.equal(ha.counts, hb.counts), name
        assert ha.numel == hb.numel and float(ha.max) == float(hb.max) and float(ha.min) == float(hb.min)


@pytest.fixture
def images():
    return _images()


# -- taps and loaders -----------------------------------------------------------------------------


def test_taps_of_a_module_called_three_times(images):
    model = Net()
    table = calibrate(model, images, progress=False)
    names = list(table)
    assert names[:4] == ["data", "conv1", "bn1", "relu"]
    for tap in ("relu", "relu#1", "relu#2", "conv2", "conv3", "pool", "fc"):
        assert tap in table
    assert names.index("relu") < names.index("conv2") < names.index("relu#1") < names.index("relu#2")
    assert table.infos["relu#2"].module == "relu" and table.infos["relu#2"].call == 2
    amaxes = [table[t].amax for t in ("relu", "relu#1", "relu#2")]
    assert len(set(amaxes)) == 3, amaxes
    assert all(a > 0 and math.isfinite(a) for a in table.amaxes().values())
    assert table["relu"].scale == table["relu"].amax / 127
    assert table.meta["num_batches"] == 4 and table.method == "entropy"


@pytest.mark.parametrize("shape", ["tuple", "list", "dict"])
def test_loader_batch_shapes_give_the_same_table(images, shape):
    ref = calibrate(Net(), images, progress=False)
    labels = [torch.zeros(len(x), dtype=torch.long) for x in images]
    if shape == "tuple":
        loader, model = list(zip(images, labels)), Net()
    elif shape == "list":
        loader, model = [[x, y] for x, y in zip(images, labels)], Net()
    else:
        loader, model = [{"x": x, "label": y, "extra": x} for x, y in zip(images, labels)], KwNet()
    table = calibrate(model, loader, progress=False)
    assert table.amaxes() == ref.amaxes()


def test_forward_callable_and_num_batches(images):
    class Batch:
        def __init__(self, x):
            self.pixels = x

    ref = calibrate(Net(), images[:2], progress=False)
    seen = []

    def forward(model, batch):
        seen.append(batch)
        return model(batch.pixels)

    endless = (Batch(images[i % 2]) for i in itertools.count())  # never ends: num_batches stops it
    table = calibrate(Net(), endless, forward=forward, num_batches=2, progress=False)
    assert len(seen) == 2 and table.meta["num_batches"] == 2
    assert table.amaxes() == ref.amaxes()
    assert calibrate(Net(), images, num_batches=2, progress=False).amaxes() == ref.amaxes()


# -- the model is left as it was -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_modes_state_and_hooks_restored(images, mode):
    model = Net()
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn1.eval()
        model.conv3.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    user_hook = model.conv2.register_forward_hook(lambda *a: None)
    calibrate(model, images, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)  # BN statistics untouched
    assert _hooks(model) == 1  # only the user's own hook is left
    user_hook.remove()
    assert _hooks(model) == 0


def test_model_raising_mid_forward_leaves_no_hooks(images):
    class Boom(RuntimeError):
        pass

    model = Net()
    model.train()
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("third batch")

    handle = model.conv2.register_forward_pre_hook(explode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Boom, match="third batch"):
        calibrate(model, images, progress=False)
    handle.remove()
    assert _hooks(model) == 0
    assert all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # and the model still calibrates normally afterwards
    assert len(calibrate(model, images, progress=False)) > 0


def test_calibrate_on_device(images, device):
    """Batches on the CPU, model on ``device``: inputs follow the model; the table is the CPU's."""
    ref = calibrate(Net(), images, "minmax", progress=False)
    model = Net().to(device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions on CUDA
    try:
        table = calibrate(model, images, "minmax", progress=False)
        entropy = calibrate(model, images, progress=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert list(table) == list(ref) == list(entropy)
    assert _hooks(model) == 0
    assert all(h.device.type == "cpu" for h in table.histograms.values())
    data, data_ref = table.histograms["data"], ref.histograms["data"]
    assert torch.equal(data.counts, data_ref.counts) and table["data"].amax == ref["data"].amax
    for name in table:  # kernels differ between devices: max|x| agrees closely, not bit for bit
        assert table[name].amax == pytest.approx(ref[name].amax, rel=1e-4), name
        assert 0 < entropy[name].amax <= table[name].amax * (1 + 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_per_batch_on_cuda(images):
    """On CUDA the forwards of a calibration never wait for the device (histograms, merges,
    ReLU taps, the NaN flag stay there): CUDA's sync debug mode raises on any host read
    inside the block; the range search after it reads the device once per batch of taps."""
    model = Net().cuda()
    batches = [x.cuda() for x in images]
    with calibration_mode(model, progress=False) as cal:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in batches:
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cal.table["data"].amax > 0


# -- errors and policies -----------------------------------------------------------------------------


def test_empty_loader():
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(Net(), [], progress=False)
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(Net(), iter(()), progress=False)


def test_unsupported_batch_names_type_and_index(images):
    model = Net()
    with pytest.raises(CalibrationError) as err:
        calibrate(model, [images[0], "not a batch"], progress=False)
    assert "batch 1" in str(err.value) and "str" in str(err.value)
    assert _hooks(model) == 0
    with pytest.raises(CalibrationError, match="batch 0 is an empty tuple"):
        calibrate(Net(), [()], progress=False)


def test_nan_activations_name_the_tap(images):
    model = Net()
    with torch.no_grad():
        model.conv3.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError) as err:
        calibrate(model, images, progress=False)
    message = str(err.value)
    assert "conv3" in message and "relu#2" in message
    assert "conv1" not in message.split(":", 1)[1]  # taps before conv3 are fine
    assert _hooks(model) == 0
    with pytest.raises(NonFiniteActivationError, match="data"):
        calibrate(Net(), [torch.full((2, 3, 8, 8), float("inf"))], progress=False)


def test_all_zero_tap_gets_unit_amax(images):
    model = Net()
    with torch.no_grad():
        model.conv2.weight.zero_()
        model.conv2.bias.zero_()
    for method in ("entropy", "minmax", "percentile", "mse"):
        table = calibrate(model, images, method, progress=False)
        assert table["conv2"].amax == 1.0 and table["conv2"].scale == 1.0 / 127
        assert table["relu#1"].amax == 1.0
        assert table["conv2"].min == 0.0 and table["conv2"].max == 0.0


def test_minmax_is_max_abs_exactly(images):
    model = Net().eval()
    table = calibrate(model, images, "minmax", progress=False)
    with torch.no_grad():
        conv1 = [model.conv1(x) for x in images]
        bn1 = [model.bn1(c) for c in conv1]
        conv2 = [model.conv2(torch.relu(b)) for b in bn1]
    for tap, values in (("data", images), ("conv1", conv1), ("bn1", bn1), ("conv2", conv2),
                        ("relu", [torch.relu(b) for b in bn1]), ("relu#1", [torch.relu(c) for c in conv2])):
        expected = max(float(v.abs().max()) for v in values)
        assert table[tap].amax == expected, tap
        assert table[tap].max == max(float(v.max()) for v in values)
        assert table[tap].min == min(float(v.min()) for v in values)


@pytest.mark.parametrize("threshold, percentile", [(0.9, 90.0), (0.29, 29.0), (1.0, 100.0)])
def test_threshold_is_a_percentile_spelling(images, threshold, percentile):
    a = calibrate(Net(), images, threshold=threshold, progress=False)
    b = calibrate(Net(), images, "percentile", percentile=percentile, progress=False)
    assert a.method == b.method == "percentile"
    assert a.meta["options"] == b.meta["options"] == {"percentile": percentile}
    assert a.amaxes() == b.amaxes()
    assert a.meta["cache_key"] == b.meta["cache_key"]
    if percentile == 100.0:  # keeps everything: the max |x| of each tap
        m = calibrate(Net(), images, "minmax", progress=False)
        assert a.amaxes() == m.amaxes()


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.5), dict(percentile=0.0),
                                 dict(method="kl"), dict(bins=1000), dict(num_batches=0)])
def test_bad_options(images, bad):
    with pytest.raises(CalibrationError):
        calibrate(Net(), images, progress=False, **bad)


def test_not_a_module(images):
    with pytest.raises(CalibrationError, match="nn.Module"):
        calibrate(lambda x: x, images, progress=False)


# -- derived ReLU taps -------------------------------------------------------------------------------


def test_derived_relu_taps_equal_direct_computation(images):
    derived = calibrate(Net(), images, progress=False)
    direct = calibrate(Net(), images, taps=TapSelection(reuse=False), progress=False)
    assert derived.meta["reused"].get("relu") == "bn1"  # bn1's positive side sets its range
    assert "relu#1" not in derived.meta["reused"]  # conv2's negative side does: not derivable
    assert direct.meta["reused"] == {}
    _same_histograms(derived, direct)
    assert derived.amaxes() == direct.amaxes()
    for method in ("minmax", "percentile", "mse"):
        assert derived.with_method(method).amaxes() == direct.with_method(method).amaxes()


def test_inplace_relu_and_identity_reuse():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU(inplace=True)
            self.drop = nn.Dropout(0.5)
            self.flat = nn.Flatten()
            with torch.no_grad():
                self.conv.bias.fill_(2.0)

        def forward(self, x):
            return self.flat(self.drop(self.act(self.conv(x))))

    xs = _images(3, 4, seed=7)
    derived = calibrate(Inplace(), xs, progress=False)
    direct = calibrate(Inplace(), xs, taps=TapSelection(reuse=False), progress=False)
    assert derived.meta["reused"] == {"act": "conv", "drop": "act", "flat": "drop"}
    _same_histograms(derived, direct)
    assert derived.amaxes() == direct.amaxes()
    assert derived["act"].min == 0.0


def test_identity_reuses_any_earlier_tap_of_the_pass_not_only_the_latest():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.body = nn.Conv2d(3, 3, 3, padding=1)
            self.shortcut = nn.Identity()
            self.late = nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            z = self.body(y)  # the latest producer is now body, not conv
            a = self.shortcut(y)  # (the same tensor object as y)
            y.mul_(2)  # modified in place: never reused, observed afresh
            return z + a + self.late(y)

    xs = _images(3, 4, seed=8)
    derived = calibrate(Residual(), xs, progress=False)
    direct = calibrate(Residual(), xs, taps=TapSelection(reuse=False), progress=False)
    # late's input changed in place after conv observed it: observed afresh as late:input
    assert derived.meta["reused"] == {"shortcut": "conv", "late": "late:input"}
    assert "late:input" in direct
    _same_histograms(derived, direct)
    assert derived.amaxes() == direct.amaxes()


def test_functional_results_are_observed_once_per_reader_by_default():
    """A ``torch.cat`` read by three modules (an Inception block): each reader gets its own
    ``:input`` tap, all three sharing one histogram; a flatten of an observed tensor is
    recognised as the same values and not observed at all."""

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
            self.c1, self.c2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            z = self.c1(y) + self.c2(y) + self.pool(y).repeat(1, 1, 2, 2)[:, :4]
            return self.fc(torch.flatten(self.pool(z), 1))

    xs = _images(2, 4, seed=9)
    table = calibrate(Inception(), xs, progress=False)
    reused = table.meta["reused"]
    assert "c1:input" in table and reused["c2:input"] == "c1:input" and reused["pool:input"] == "c1:input"
    assert "pool#1:input" in table  # the sum z: a functional result
    assert "fc:input" not in table  # flatten of the observed pool#1 output: the same values
    direct = calibrate(Inception(), xs, taps=TapSelection(reuse=False), progress=False)
    assert list(direct) == list(table)
    _same_histograms(table, direct)


# -- cache ------------------------------------------------------------------------------------------------


def test_cache_reused_without_running_the_model(images, tmp_path, capsys):
    path = tmp_path / "calib.json"
    model = Counting()
    first = calibrate(model, images, cache=path, progress=False)
    assert path.exists() and model.calls == len(images)
    again = calibrate(model, images, cache=path, progress=False)
    assert model.calls == len(images)  # no forward
    assert again.amaxes() == first.amaxes()
    assert "using calibration cache" in capsys.readouterr().err
    other_data = calibrate(Counting(), images[:1], cache=path, progress=False)  # same model & method
    assert "different data" in capsys.readouterr().err  # fewer batches: recalibrated
    assert other_data.meta["num_batches"] == 1


def _edit_cache(path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("edit", [
    lambda o: o["taps"].clear(),
    lambda o: o["taps"][1].update(amax=o["taps"][1]["amax"] * 2, scale=o["taps"][1]["amax"] * 2 / 127),
    lambda o: o["taps"].pop(2),
    lambda o: o["taps"].append(dict(o["taps"][1], name="extra")),
    lambda o: o["taps"][1].update(name="renamed"),
    lambda o: o["meta"].update(method="minmax"),
], ids=["emptied", "amax-changed", "tap-removed", "tap-added", "tap-renamed", "meta-edited"])
def test_hand_edited_cache_is_noticed_and_recalibrated(images, tmp_path, capsys, edit):
    path = tmp_path / "calib.json"
    first = calibrate(Counting(), images, cache=path, progress=False)
    _edit_cache(path, edit)
    model = Counting()
    capsys.readouterr()
    again = calibrate(model, images, cache=path, progress=False)
    assert "modified after it was written" in capsys.readouterr().err
    assert model.calls == len(images) and again.amaxes() == first.amaxes()


def test_duplicated_tap_in_cache_is_a_named_error(images, tmp_path, capsys):
    path = tmp_path / "calib.json"
    calibrate(Counting(), images, cache=path, progress=False)
    _edit_cache(path, lambda o: o["taps"].append(o["taps"][1]))
    with pytest.raises(FileFormatError, match="appears twice"):
        CalibrationTable.load(path)
    model = Counting()
    calibrate(model, images, cache=path, progress=False)
    assert "unusable" in capsys.readouterr().err and model.calls == len(images)


def _bn_stats(m):
    m.bn1.running_mean.add_(0.5)


def _bn_eps(m):
    m.bn1.eps = 0.1


def _permute_filters(m):
    m.conv1.weight.data = m.conv1.weight.data.flip(0)
    m.conv1.bias.data = m.conv1.bias.data.flip(0)


def _swap_equal_sums(m):
    w = m.conv1.weight.data.view(-1)
    w[0], w[1] = w[1].clone(), w[0].clone()


def _forward_changed(m):
    m.forward = lambda x: Counting.forward(m, x * 2)


@pytest.mark.parametrize("change", [_bn_stats, _bn_eps, _permute_filters, _swap_equal_sums, _forward_changed,
                                    lambda m: m.double(), "data", "num_batches"],
                         ids=["bn-stats", "bn-eps", "permuted-filters", "swapped-weights", "forward", "double",
                              "data", "num_batches"])
def test_cache_key_covers_model_and_data(images, tmp_path, capsys, change):
    path = tmp_path / "calib.json"
    calibrate(Counting(), images, cache=path, progress=False)
    model = Counting()
    data, kwargs = images, {}
    if change == "data":
        data = [x + 1 for x in images]
    elif change == "num_batches":
        kwargs["num_batches"] = len(images) - 1
    else:
        change(model)
        if model.conv1.weight.dtype == torch.float64:
            data = [x.double() for x in images]
    capsys.readouterr()
    calibrate(model, data, cache=path, progress=False, **kwargs)
    assert "recalibrating" in capsys.readouterr().err and model.calls > 0


def test_cache_key_covers_a_custom_tap_predicate(images, tmp_path):
    path = tmp_path / "calib.json"
    first = calibrate(Net(), images, taps=TapSelection(outputs=lambda p, m: p == "conv1"), cache=path, progress=False)
    second = calibrate(Net(), images, taps=TapSelection(outputs=lambda p, m: p == "conv2"), cache=path, progress=False)
    assert list(first) == ["data", "conv1"] and list(second) == ["data", "conv2"]


def test_one_shot_iterator_never_reuses_a_cache(images, tmp_path, capsys):
    path = tmp_path / "calib.json"
    calibrate(Counting(), images, cache=path, progress=False)
    model = Counting()
    capsys.readouterr()
    calibrate(model, iter(images), cache=path, progress=False)
    assert "one-shot iterator" in capsys.readouterr().err and model.calls == len(images)


@pytest.mark.parametrize("change", ["model", "method", "percentile", "bins"])
def test_incompatible_cache_is_recalibrated_and_overwritten(images, tmp_path, capsys, change):
    path = tmp_path / "calib.json"
    calibrate(Counting(), images, "percentile", percentile=99.0, cache=path, progress=False)
    before = json.loads(path.read_text())
    kwargs = dict(method="percentile", percentile=99.0, bins=2048)
    model: nn.Module = Counting()
    if change == "model":
        model = Other()
    elif change == "method":
        kwargs["method"] = "minmax"
    elif change == "percentile":
        kwargs["percentile"] = 90.0
    else:
        kwargs["bins"] = 1024
    capsys.readouterr()
    table = calibrate(model, images, cache=path, progress=False, **kwargs)
    assert "recalibrating" in capsys.readouterr().err
    if change != "model":
        assert model.calls == len(images)
    after = json.loads(path.read_text())
    assert after != before and after["meta"]["cache_key"] == table.meta["cache_key"]
    assert CalibrationTable.load(path).amaxes() == table.amaxes()


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage",
    b'{"taps": [',
    b'{"hello": "world"}\n',
    b"TRT-8601-EntropyCalibration2\ndata: 3c010a14\n",
    b'{"format": "torch_nvdla.calibration_table", "version": 1, "taps": [{"name": "x", "amax": -1}]}',
])
def test_corrupt_or_foreign_cache_is_recalibrated_with_a_message(images, tmp_path, capsys, content):
    path = tmp_path / "calib.json"
    path.write_bytes(content)
    model = Counting()
    table = calibrate(model, images, cache=path, progress=False)
    err = capsys.readouterr().err
    assert "unusable" in err and "recalibrating" in err and "Traceback" not in err
    assert model.calls == len(images)
    assert CalibrationTable.load(path).amaxes() == table.amaxes()


def test_with_method_table_is_not_a_cache_for_the_original_method(images, tmp_path):
    path = tmp_path / "calib.json"
    table = calibrate(Net(), images, progress=False)
    table.with_method("minmax").save(path)
    model = Counting()
    again = calibrate(model, images, cache=path, progress=False)  # entropy: must not reuse minmax ranges
    assert model.calls == len(images)
    assert again.amaxes() == table.amaxes()


# -- table files, histogram dumps, re-picking -----------------------------------------------------------


def test_table_save_load_round_trip(images, tmp_path):
    table = calibrate(Net(), images, "percentile", percentile=99.9, progress=False)
    path = table.save(tmp_path / "sub" / "t.json")
    back = CalibrationTable.load(path)
    assert list(back) == list(table)
    assert back.amaxes() == table.amaxes() and back.scales() == table.scales()
    assert all(back[n] == table[n] for n in table)
    assert back.infos == table.infos
    assert back.meta == json.loads(json.dumps(table.meta))
    assert back.histograms == {}
    with pytest.raises(ValueError, match="no histograms"):
        back.with_method("minmax")
    with pytest.raises(KeyError, match="no tap 'relu#9'"):
        table["relu#9"]


def test_save_histograms(images, tmp_path):
    table = calibrate(Net(), images, progress=False)
    out = table.save_histograms(tmp_path / "hist")
    index = json.loads((out / "index.json").read_text())
    assert list(index) == list(table)
    for name, entry in index.items():
        with np.load(out / entry["file"]) as npz:
            assert float(npz["amax"]) == table[name].amax
            assert int(npz["counts"].sum()) == table.histograms[name].numel == entry["numel"]
            assert len(npz["edges"]) == len(npz["counts"]) + 1 == 2049
        if "plot" in entry:
            assert (out / entry["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "relu_1.npz").exists() and (out / "relu_2.npz").exists()  # '#' is not in file names
    pytest.importorskip("matplotlib")
    assert (out / "relu.png").exists()


def test_with_method_repicks_without_data(images):
    model = Counting()
    table = calibrate(model, images, progress=False)
    calls = model.calls
    for method, kwargs in (("minmax", {}), ("mse", {}), ("percentile", {"percentile": 99.0})):
        repicked = table.with_method(method, **kwargs)
        fresh = calibrate(Net(), images, method, progress=False, **kwargs)
        assert repicked.amaxes() == fresh.amaxes(), method
        assert repicked.method == method
        assert {r.method for n, r in repicked.items() if n != "data"} == {method}
    assert model.calls == calls
    assert table.method == "entropy"  # the original is untouched


# -- command line ---------------------------------------------------------------------------------------


def test_cli_calibrate_json(tmp_path, capsys):
    cli = pytest.importorskip("torch_nvdla.cli")
    try:
        import torch_nvdla.zoo.registry  # noqa: F401
    except ImportError as e:
        pytest.skip(f"model zoo not available: {e}")
    out = tmp_path / "table.json"
    rc = cli.main(["calibrate", "--model", "digits-lenet", "--num-images", "100", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    if rc != 0 and "sklearn" in captured.out + captured.err:
        pytest.skip("scikit-learn (digits data) not installed")
    assert rc == 0, captured.err
    printed = json.loads(captured.out)
    saved = CalibrationTable.load(out)
    assert printed["format"] == "torch_nvdla.calibration_table"
    assert [t["name"] for t in printed["taps"]] == list(saved)
    assert printed["taps"][0]["name"] == "data"
    assert all(t["amax"] > 0 for t in printed["taps"])
    assert saved.meta["num_batches"] == 1  # 100 images at the default batch size of 100


def test_cache_is_not_reused_for_retrained_weights(tmp_path):
    from torch_nvdla.model.state import model_fingerprint

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())  # same architecture, other weights
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a) != model_fingerprint(b)
    cache = tmp_path / "t.calib"
    x = torch.randn(16, 4)
    calibrate(a, [x], "minmax", cache=cache, progress=False)
    t_b = calibrate(b, [x], "minmax", cache=cache, progress=False)
    with torch.no_grad():
        assert t_b["0"].amax == pytest.approx(float(b[0](x).abs().max()))


def test_clipped_shares_of_a_batch_equal_one_by_one():
    """The degeneracy check's clipped share, computed for a whole entropy batch, equals a
    bin-by-bin count row by row (amax on an edge, inside a bin, above every edge; an
    all-zero row)."""
    from torch_nvdla.calib.table import _clipped_fractions

    def _clipped_fraction(c, e, a):  # bins 1.. whose lower edge is at or above amax, by hand
        nonzero = sum(int(v) for v in c[1:])
        above = sum(int(v) for v, lo in zip(c[1:], e[1:-1]) if float(lo) >= a)
        return above / nonzero if nonzero else 0.0

    g = torch.Generator().manual_seed(16)
    counts = torch.randint(0, 50, (5, 64), generator=g)
    counts[4] = 0
    counts[3, 1:] = 0  # only zeros: nothing nonzero to clip
    edges = torch.linspace(0, 2, 65, dtype=torch.float64).repeat(5, 1)
    amax = [0.5, 0.51, 3.0, 1.0, 1.0]
    want = [_clipped_fraction(c, e, a) for c, e, a in zip(counts, edges, amax)]
    assert _clipped_fractions(counts, edges, amax) == want
    assert want[2] == want[3] == want[4] == 0.0 and 0.0 < want[0] < 1.0
