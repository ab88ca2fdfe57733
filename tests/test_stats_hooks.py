"""The hooks in the awkward cases a real model brings, each checked against NumPy on the
tensors the model produced: tuple and dict outputs, in-place ReLU, a module called
several times per forward, gradient accumulation, bf16 autocast, torch.compile, and (on
CUDA) no host-device sync. Training runs in this process; the statistics are read from the
agent's real telemetry socket."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.config import Config
from neurotop.protocol import wire
from neurotop.training.stats import first_tensor
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports


class Telemetry(Reports):
    """The monitor's reports (subscribed before the first step), each read as the schema it
    was made under, its block and its scalars."""

    def stats(self, step: int) -> tuple[dict, np.ndarray, np.ndarray]:  # type: ignore[override]
        m = self._message(wire.STATS, step)
        return self._schema(m.header["schema_id"]), *m.arrays


class Capture:
    """What each named module output (every call) and the gradient at each output."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outs: dict[str, list[np.ndarray]] = defaultdict(list)
        self.grads: dict[str, list[np.ndarray]] = defaultdict(list)
        mods = dict(model.named_modules())
        for n in names:
            mods[n].register_forward_hook(lambda m, i, o, n=n: self._out(n, o))

    @torch.compiler.disable  # a test probe: it reads values, so it stays out of graphs
    def _out(self, name: str, out) -> None:
        t = first_tensor(out)
        self.outs[name].append(t.detach().float().numpy().copy())
        if t.requires_grad:
            t.register_hook(lambda g: self.grads[name].append(g.float().numpy().copy()))


def expected_row(cap: Capture, name: str, stats: list[str], cfg: Config) -> list[float]:
    """NumPy statistics over every call of ``name`` in the report (rows stacked)."""
    a = np.concatenate([o.reshape(-1, o.shape[-1]) for o in cap.outs[name]])
    g = np.concatenate([x.reshape(-1, x.shape[-1]) for x in cap.grads[name]]) \
        if cap.grads[name] else None
    r = ref.layer_stats(a, g, sample=cfg.sample, eps=cfg.eps,
                        units_max_window=a.max(axis=0))
    return [r[s] for s in stats]


def check(mon: neurotop.Monitor, tel: Telemetry, cap: Capture, names: list[str],
          rtol: float = 1e-4) -> np.ndarray:
    schema, block, _ = tel.stats(mon.step)
    rows = [schema["layers"].index(n) for n in names]
    expected = np.array([expected_row(cap, n, schema["stats"], mon.config) for n in names])
    np.testing.assert_allclose(block[rows], expected, rtol=rtol, atol=1e-6)
    return block[rows]


def train_step(model, opt, mon, x, y, micro: int = 1) -> None:
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
        loss = nn.functional.cross_entropy(model(xs), ys) / micro
        loss.backward()
    mon.observe(loss=loss)
    opt.step()


def data(n: int = 32, d: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture
def small_output(request, monkeypatch):
    """``SMALL_OUTPUT`` for this test: outputs of more values are measured in their hooks,
    the others copied into batches (``neurotop.training.batched_calls``)."""
    if request.param is not None:
        monkeypatch.setattr("neurotop.training.collector.SMALL_OUTPUT", request.param)
    return request.param


#: Every output measured in its hook (0), the conv's batched and the larger ones not
#: (7000, for ``Shapes``), all batched (the default: every output in these tests is small).
PATHS = pytest.mark.parametrize("small_output", [0, 7000, None], indirect=True,
                                ids=["in-hook", "mixed", "batched"])


class TupleOut(nn.Module):
    """A leaf (no child modules) returning a tuple, like an RNN."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.5)

    def forward(self, x):
        return x @ self.w, "not a tensor"


class DictOut(nn.Module):
    def forward(self, x):
        return {"note": None, "h": torch.tanh(x) - 0.1}


class Shared(nn.Module):
    """One Linear applied three times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        for _ in range(3):
            x = torch.relu(self.lin(x))
        return self.head(x)


class Unpack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t, self.d, self.head = TupleOut(), DictOut(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.d(self.t(x)[0])["h"])


def test_tuple_and_dict_outputs():
    torch.manual_seed(0)
    model = Unpack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["t", "d"])
    with neurotop.watch(model, opt, report_every=1, signal_layers=["*"]) as mon:
        tel = Telemetry(mon)
        train_step(model, opt, mon, *data())
        check(mon, tel, cap, ["t", "d"])
        tel.close()


def test_inplace_relu_keeps_the_layer_before_it_intact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["0", "1"])
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        train_step(model, opt, mon, *data())
        got = check(mon, tel, cap, ["0", "1"])
        tel.close()
    stats = list(mon.config.stats)
    assert got[0, stats.index("mean")] < got[1, stats.index("mean")]  # before ReLU: negatives
    assert got[0, stats.index("zero_frac")] == 0 and got[1, stats.index("zero_frac")] > 0.2


@PATHS
def test_module_called_several_times_pools_every_call(small_output):
    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["lin"])
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        train_step(model, opt, mon, *data())
        assert len(cap.outs["lin"]) == 3 and len(cap.grads["lin"]) == 3
        check(mon, tel, cap, ["lin"])
        tel.close()


class Mixed(nn.Module):
    """Units of one width from calls of several shapes: ``lin2`` runs on the whole batch and
    on its first 4 rows (another shape, small enough to be batched at ``SMALL_OUTPUT`` 1000)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = torch.relu(self.lin1(x))
        h = torch.relu(self.lin2(h)) + torch.relu(self.lin2(h[:4])).mean(0)
        return self.head(h)


@pytest.mark.parametrize("small_output", [1000], indirect=True)
def test_unit_maxima_of_calls_measured_apart_fold_into_each_layer(small_output):
    """Dead units of layers whose calls' maxima came in blocks of different sizes (folded
    in the hook, one row per call from a batch), one layer with two blocks, as NumPy."""
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.lin2.bias[:20] = -50.0  # 20 units of lin2 never fire
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cap = Capture(model, ["lin1", "lin2"])
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        for _ in range(2):
            train_step(model, opt, mon, *data())
            got = check(mon, tel, cap, ["lin1", "lin2"])
            cap.outs.clear()
            cap.grads.clear()
        tel.close()
    stats = list(mon.config.stats)
    assert got[1, stats.index("dead_frac")] >= 20 / 64  # and as NumPy counts them (above)


@PATHS
def test_gradient_accumulation_pools_the_micro_batches(small_output):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["0", "1", "2"])
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        x, y = data(64)
        train_step(model, opt, mon, x, y, micro=4)
        assert len(cap.outs["0"]) == 4 and len(cap.grads["2"]) == 4
        check(mon, tel, cap, ["0", "1", "2"])
        schema, _, scalars = tel.stats(mon.step)
        # The accumulated gradient is what the optimizer used: its norm is reported.
        g = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
        assert scalars[schema["scalars"].index("grad_norm")] == pytest.approx(g, rel=1e-5)
        train_step(model, opt, mon, x, y, micro=4)
        schema, _, scalars = tel.stats(mon.step)
        sc = dict(zip(schema["scalars"], scalars.tolist(), strict=True))
        assert sc["samples_per_s"] == pytest.approx(64 * sc["steps_per_s"], rel=1e-4)
        tel.close()


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["0", "1", "2"])
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        x, y = data()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
        check(mon, tel, cap, ["0", "1", "2"], rtol=1e-3)
        tel.close()


@pytest.mark.slow  # compiling takes many seconds on a small CPU
def test_hooks_registered_before_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, ["0", "1", "2"])
    with neurotop.watch(model, opt, report_every=2) as mon:
        compiled = torch.compile(model)
        tel = Telemetry(mon)
        x, y = data()
        for _ in range(3):  # report steps 1 and 3; step 2 runs the hook-free graph
            for v in (cap.outs, cap.grads):
                v.clear()
            train_step(compiled, opt, mon, x, y)
        check(mon, tel, cap, ["0", "1", "2"])
        tel.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_device_sync_on_cuda():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(512, 64, device=dev)
    y = torch.randint(0, 10, (512,), device=dev)
    with neurotop.watch(model, opt, report_every=1, hist_every=1, signal_layers=["*"]) as mon:
        tel = Telemetry(mon)
        train_step(model, opt, mon, x, y)  # first report: allocations, warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                train_step(model, opt, mon, x, y, micro=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        schema, block, _ = tel.stats(mon.step)
        assert np.isfinite(block[:, schema["stats"].index("max_abs")]).all()
        tel.close()


@pytest.mark.parametrize("stats", [("nonfinite",), ("nonfinite", "max_abs", "dead_frac")])
def test_nonfinite_count_is_exact_for_nan_and_inf(stats):
    """On the CPU the count runs only when max/min show a non-finite value: it must still be
    exact for NaN, +inf and -inf, with or without the max and unit statistics."""
    from neurotop.service.finalize import NONFINITE
    from neurotop.training.stats import Needs, activation_row, call_plan

    cfg = Config(stats=stats)

    def row_of(x: torch.Tensor) -> list[torch.Tensor]:
        plan = call_plan(x.shape, x.is_contiguous(), 1, cfg.sample)
        return activation_row(x, plan, Needs(cfg.stats), torch.zeros(()), None)[0]

    x = torch.randn(64, 32)
    row = row_of(x)
    assert row[NONFINITE].item() == 0
    x[3, 4] = x[10, 0] = float("nan")
    x[5, 5], x[63, 31] = float("inf"), float("-inf")
    for planted in (x, x[:, :16].contiguous(), x.clone().fill_(float("-inf"))):
        row = row_of(planted)
        assert row[NONFINITE].item() == (~np.isfinite(planted.numpy())).sum()


class Transposed(nn.Module):
    """A leaf whose output is a transposed view: not contiguous."""

    def forward(self, x):
        return x.t()


class Shapes(nn.Module):
    """Outputs whose layout the hooks must read right: channels (dim 1) as units, rows
    wider than the sample, and an output that is not contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.wide = nn.Linear(8 * 6 * 6, 300)
        self.tr = Transposed()
        self.head = nn.Linear(300, 3)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        return self.head(self.tr(self.wide(h)).t())  # tr: [300 x batch], units = the batch


@PATHS
def test_channel_units_wide_rows_and_non_contiguous_outputs(small_output):
    torch.manual_seed(0)
    model = Shapes()
    with torch.no_grad():
        model.conv.bias[0] = -100.0  # a dead channel: dead along dim 1, not along W
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = ["conv", "act", "wide", "tr"]
    cap = Capture(model, names)
    x = torch.randn(24, 3, 6, 6)
    y = torch.randint(0, 3, (24,))
    with neurotop.watch(model, opt, report_every=1, signal_layers=["*"], sample=256) as mon:
        tel = Telemetry(mon)
        train_step(model, opt, mon, x, y)
        schema, block, _ = tel.stats(mon.step)
        tel.close()
    stats = schema["stats"]
    assert not model.tr(torch.zeros(2, 3)).is_contiguous()
    assert cap.outs["conv"][0].ndim == 4 and cap.outs["wide"][0].shape[-1] > 256
    for name in names:
        a, g = cap.outs[name][0], cap.grads[name][0]
        units = np.moveaxis(a, 1, -1) if a.ndim == 4 else a  # channels of NCHW
        umax = units.reshape(-1, units.shape[-1]).max(axis=0)
        want = ref.layer_stats(a, g, sample=256, eps=mon.config.eps, units_max_window=umax)
        want["dead_frac"] = np.mean(umax <= 0)
        got = block[schema["layers"].index(name)]
        if name in ("conv", "act"):
            assert got[stats.index("dead_frac")] == 1 / 8
        np.testing.assert_allclose(got, [want[s] for s in stats], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


class Cut(nn.Module):
    """A leaf whose width is its caller's choice: its unit count changes between calls."""

    def forward(self, h, k):
        return h[:, :k]


class TwoWidths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.cut, self.head = nn.Linear(8, 6), Cut(), nn.Linear(10, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head(torch.cat([self.cut(h, 6), self.cut(h, 4)], 1))


@PATHS
def test_a_layer_whose_unit_count_changes_counts_the_units_of_its_last_call(small_output):
    """Units 0 and 4 of ``lin`` are never positive; ``cut`` sees 6 units, then 4 in the same
    forward. Its dead units are those of its last width: 1 of 4, now and over the window
    (unit 4 of the 6-wide call is not one of them)."""
    torch.manual_seed(0)
    model = TwoWidths()
    with torch.no_grad():
        model.lin.bias[0] = model.lin.bias[4] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, report_every=1) as mon:
        tel = Telemetry(mon)
        for _ in range(2):
            train_step(model, opt, mon, *data())
            schema, block, _ = tel.stats(mon.step)
            stats, layers = schema["stats"], schema["layers"]
            for name, dead in (("cut", 1 / 4), ("lin", 2 / 6)):
                row = block[layers.index(name)]
                assert row[stats.index("dead_frac")] == dead, name
                assert row[stats.index("dead_frac_window")] == dead, name
        tel.close()
