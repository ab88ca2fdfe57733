"""A small GAN with two optimizers, stepped DCGAN-style (D, then G, each iteration), watched
as one run: ``watch({"G": G, "D": D}, [opt_d, opt_g])``. One report per iteration, layer and
parameter rows named by model, each optimizer's parameter rows taken at its own step (D's
gradients at D's step, not after G's backward added to them), ``lr.D``/``lr.G`` scalars and
``lr[G]`` knobs, and alerts that name the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports

BCE = nn.functional.binary_cross_entropy_with_logits


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.main(x)


class StepProbe:
    """Plain hooks on an optimizer: its parameters and gradients around each step."""

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.before: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.after: dict[str, np.ndarray] = {}
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.names = names
        opt.register_step_pre_hook(lambda o, a, k: self.before.update(
            {names[id(p)]: (p.detach().numpy().copy(), p.grad.numpy().copy())
             for p in self.params}))
        opt.register_step_post_hook(lambda o, a, k: self.after.update(
            {names[id(p)]: p.detach().numpy().copy() for p in self.params}))


def gan(dead_g: bool = False):
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    if dead_g:
        with torch.no_grad():
            g.main[0].bias.fill_(-100.0)  # every unit of G's ReLU is dead
    opt_g = torch.optim.Adam(g.parameters(), lr=0.02, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=0.01, betas=(0.5, 0.999))
    return g, d, opt_g, opt_d


def iteration(g, d, opt_g, opt_d, mon, gen: torch.Generator) -> None:
    real = torch.randn(32, 2, generator=gen) * 0.5 + 2.0
    z = torch.randn(32, 4, generator=gen)
    opt_d.zero_grad()
    err_real = BCE(d(real), torch.ones(32, 1))
    err_real.backward()
    fake = g(z)
    err_fake = BCE(d(fake.detach()), torch.zeros(32, 1))
    err_fake.backward()
    opt_d.step()
    opt_g.zero_grad()
    err_g = BCE(d(fake), torch.ones(32, 1))  # also adds to D's gradients
    err_g.backward()
    mon.observe(loss=err_g, loss_d=err_real + err_fake)
    opt_g.step()  # the step boundary: the last optimizer in the list


def test_gan_is_one_run_with_per_optimizer_rows():
    g, d, opt_g, opt_d = gan()
    models = {"G": g, "D": d}
    names = {id(p): f"{k}.{n}" for k, m in models.items() for n, p in m.named_parameters()}
    probe_d, probe_g = StepProbe(opt_d, names), StepProbe(opt_g, names)
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch(models, [opt_d, opt_g], report_every=2, record=False) as mon:
        reports = Reports(mon)
        d_grads_at_g_step = {}
        for k in range(1, 6):
            iteration(g, d, opt_g, opt_d, mon, gen)
            if k == 3:
                d_grads_at_g_step = {names[id(p)]: p.grad.numpy().copy() for p in d.parameters()}
                want_d = {n: ref.param_stats(b, probe_d.after[n], gr, 4096)
                          for n, (b, gr) in probe_d.before.items()}
                want_g = {n: ref.param_stats(b, probe_g.after[n], gr, 4096)
                          for n, (b, gr) in probe_g.before.items()}
        assert mon.step == 5
        assert reports.steps(last=5)[:3] == [1, 3, 5]
        got = reports.stats(3)
        params = reports.params(3)
        reports.close()
    schema = got.schema
    assert {"G.main.0", "G.main.1", "D.main.0", "D.main.1"} <= set(schema["layers"])
    assert list(params) == [*want_d, *want_g]  # D's rows, then G's: the optimizers' order
    for want in (want_d, want_g):
        for n, row in want.items():
            for s, v in row.items():
                assert params[n][s] == pytest.approx(v, rel=1e-4, abs=1e-7), (n, s)
    # D's rows are D's step: G's backward changed D's gradients after it.
    n = "D.main.0.weight"
    assert not np.allclose(d_grads_at_g_step[n], probe_d.before[n][1])
    sc = got.scalars
    assert (sc["lr.D"], sc["lr.G"]) == pytest.approx((0.01, 0.02))
    gd = np.sqrt(sum(want_d[n]["grad_norm"] ** 2 for n in want_d))
    gg = np.sqrt(sum(want_g[n]["grad_norm"] ** 2 for n in want_g))
    assert sc["grad_norm.D"] == pytest.approx(gd, rel=1e-5)
    assert sc["grad_norm.G"] == pytest.approx(gg, rel=1e-5)
    assert sc["grad_norm"] == pytest.approx(np.hypot(gd, gg), rel=1e-5)
    assert "loss_d" in sc and np.isfinite(sc["loss_d"])


def test_lr_knob_per_optimizer_and_alerts_name_the_model():
    g, d, opt_g, opt_d = gan(dead_g=True)
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch([g, d], [opt_d, opt_g], report_every=1, record=False,
                        alerts={"persist": 1}) as mon:
        reports = Reports(mon)
        info = mon.connection
        client = LiveClient(Endpoints(info.telemetry, info.control, info.key_bytes)).start()
        try:
            fut = client.command("set", {"knob": "lr[Generator]", "value": 0.5, "op": "mul"})
            for _ in range(50):
                iteration(g, d, opt_g, opt_d, mon, gen)
                if fut.done():
                    break
            ack = fut.result(10)
            assert ack["ok"] and ack["applied_to"] == ["1"]
            assert opt_g.param_groups[0]["lr"] == pytest.approx(0.01)
            assert opt_d.param_groups[0]["lr"] == pytest.approx(0.01)
            for _ in range(3):
                iteration(g, d, opt_g, opt_d, mon, gen)
            step = mon.step
            got = reports.stats(step)
            assert got.scalars["lr.Generator"] == pytest.approx(0.01)
            assert got.scalars["lr.Discriminator"] == pytest.approx(0.01)
            assert got.layer("Discriminator.main.1")["dead_frac"] < 1
            reports.steps()
            alerts = [e for e in reports.events("alert") if e["alert"] == "dying_layer"]
        finally:
            client.close()
            reports.close()
    assert "Generator.main.1" in {e["layer"] for e in alerts}
    assert all(e["layer"].startswith("Generator.") and e["layer"] in e["message"]
               for e in alerts)


def test_critic_stepped_several_times_is_measured_once_and_clipped_alone():
    """WGAN-style: the critic (D) steps 3 times per generator step; the boundary is G's.
    D's rows come from its first step in the window; ``grad_clip`` clips each optimizer's
    own gradients before its own step (checked on the SGD updates they made)."""
    g, d, _, _ = gan()
    opt_g = torch.optim.SGD(g.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1)
    models = {"G": g, "D": d}
    names = {id(p): f"{k}.{n}" for k, m in models.items() for n, p in m.named_parameters()}
    firsts: list[dict] = []
    opt_d.register_step_pre_hook(lambda o, a, k: firsts.append(
        {names[id(p)]: (p.detach().numpy().copy(), p.grad.numpy().copy())
         for p in d.parameters()}))
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch(models, [opt_d, opt_g], report_every=2, record=False) as mon:
        reports = Reports(mon)

        def iterate() -> None:
            for _ in range(3):
                real = torch.randn(32, 2, generator=gen) + 2.0
                fake = g(torch.randn(32, 4, generator=gen)).detach()
                opt_d.zero_grad()
                (d(fake).mean() - d(real).mean()).backward()
                opt_d.step()
            opt_g.zero_grad()
            loss = -d(g(torch.randn(32, 4, generator=gen))).mean()
            loss.backward()
            mon.observe(loss=loss)
            opt_g.step()

        for _ in range(2):
            iterate()
        firsts.clear()
        after_first: dict = {}
        h = opt_d.register_step_post_hook(lambda o, a, k: after_first.setdefault(
            "w", {names[id(p)]: p.detach().numpy().copy() for p in d.parameters()}))
        iterate()  # step 3: a report
        h.remove()
        params = reports.params(3)
        assert mon.step == 3 and len(firsts) == 3
        for n, (before, grad) in firsts[0].items():
            with np.errstate(invalid="ignore"):  # the output bias's gradient is 0: cos 0/0
                want = ref.param_stats(before, after_first["w"][n], grad, 4096)
            for s in ("grad_norm", "weight_norm", "update_ratio"):
                assert params[n][s] == pytest.approx(want[s], rel=1e-4), (n, s)

        mon.knobs.apply("grad_clip", 1e-3, "set")
        w_d = [p.detach().clone() for p in d.parameters()]
        w_g = [p.detach().clone() for p in g.parameters()]
        iterate()
        def moved(ps, w0) -> float:
            return float(torch.sqrt(sum(((p.detach() - w) ** 2).sum()
                                        for p, w in zip(ps, w0, strict=True))))

        # G's one step moved it by exactly lr * max_norm: clipped on its own gradients
        # (with D's in the norm it would have moved less); D's three by at most that each.
        assert moved(g.parameters(), w_g) == pytest.approx(0.1 * 1e-3, rel=1e-3)
        assert moved(d.parameters(), w_d) <= 3 * 0.1 * 1e-3 * (1 + 1e-3)
        reports.close()


async def test_the_lr_plot_draws_each_optimizers_learning_rate(tmp_path):
    """Replayed in the UI, a GAN's overview plots ``lr.D`` and ``lr.G`` as two lines, each
    named with its value, where one optimizer's ``lr`` would be."""
    from neurotop.tui.data.replay_source import ReplaySource
    from neurotop.tui.screens.dashboard import Plot
    from neurotop.tui.screens.replay_app import ReplayApp
    from tests.helpers.pilot import until

    g, d, opt_g, opt_d = gan()
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch({"G": g, "D": d}, [opt_d, opt_g], report_every=1,
                        record=tmp_path) as mon:
        for _ in range(30):
            iteration(g, d, opt_g, opt_d, mon, gen)
        path = mon.recorder.path
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            plot = app.query_one("#ov-plot-1", Plot)
            await until(pilot, lambda: app.store.status.step == 30, what="the recording")
            await until(pilot, lambda: "D 0.0100" in plot.text, what="the lr plot")
            title, *rows = plot.text.splitlines()
            assert title.startswith("lr  D 0.0100 · G 0.0200"), title
            drawn = [r for r in rows[:-1] if any("\u2800" < c <= "\u28ff" for c in r)]
            assert len(drawn) == 2, "two flat lines, at 0.01 and 0.02:\n" + plot.text
            top, bottom = (float(r.split("┤")[0]) for r in (rows[0], rows[-2]))
            assert (top, bottom) == pytest.approx((0.02, 0.01)), plot.text  # the axis' ends
    finally:
        source.close()
