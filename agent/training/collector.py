"""What the hooks collect during one report window, on the training thread.

A window is the forwards and backwards between two report boundaries. Every call of a
measured module appends one row and one sample (see ``neurotop.training.stats``) and keeps its
per-unit maxima; every gradient hook call keeps ||dL/dh|| (and, on histogram reports, a
sample of dL/dh). ``pack`` concatenates them into a few device tensors for the report's
one copy and starts a fresh window. Host-side facts (which layer each row belongs to,
sample sizes, unit counts, the forward order) are Python ints taken from shapes, never
from values.

Two facts about the model's structure come from the autograd graph the forward builds, not
from values: which layers feed a functional activation (``F.relu(self.fc1(x))``: ``fc1``'s
dead units are then dead ReLU units) or compute one themselves (a custom activation module
calling ``F.gelu``), and how often a layer runs in one forward of the model (a module
called from two places is pooled into one row). Both go into the schema
(``activations``, ``calls``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neurotop.config import Config
from neurotop.service.finalize import ROW_COLS
from neurotop.training.batched_calls import SMALL_OUTPUT, CallBatch
from neurotop.training.layers import LayerSpec, unit_dim_for
from neurotop.training.stats import (
    CallPlan,
    Needs,
    SummaryLayout,
    activation_row,
    call_plan,
    cpu_row,
    first_tensor,
    hist_counts,
    hist_counts_at,
    hist_layout,
    pool_by_layer,
    stack_by_size,
    summarize,
    summarize_layout,
    summary_layout,
    take_sample,
    to_device,
)

#: Autograd nodes of activation functions whose output is positive exactly where its input is,
#: so "never positive" means the same before and after them: a unit whose pre-activation is
#: never positive is dead. By node name without ``Backward<k>``.
ACTIVATION_OPS = {"Relu": "relu", "Gelu": "gelu", "Silu": "silu", "Mish": "mish",
                  "LeakyRelu": "leaky_relu", "Elu": "elu", "Celu": "celu",
                  "Hardswish": "hardswish", "Threshold": "threshold", "RreluWithNoise": "rrelu",
                  "Prelu": "prelu", "PreluKernel": "prelu"}
#: Nodes walked through from a layer's input back to an activation: they keep a unit's
#: sign (pooling, dropout, reshapes), as between ``F.relu(self.conv(x))`` and the next layer.
_PASS_OPS = ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "NativeDropout",
             "View", "UnsafeView", "Reshape", "Clone", "Transpose", "Permute")
_WALK = 6  # nodes at most from a layer's input back to the activation
#: The autograd graph is read (``_note_graph``, ~8 us per call) in the first
#: ``GRAPH_WINDOWS`` report windows, then in every ``GRAPH_EVERY``-th: the structure it
#: finds (which layers feed an activation) is the model's code, which rarely changes.
GRAPH_WINDOWS, GRAPH_EVERY = 3, 16


def _op(node: Any) -> str:
    """An autograd node's operation: its name without ``Backward<k>``."""
    name = node.name()
    k = name.rfind("Backward")
    return name[:k] if k > 0 else name


def activation_of(node: Any) -> str:
    """The activation (``"relu"``) whose autograd node this is, or ``""``."""
    return ACTIVATION_OPS.get(_op(node), "") if node is not None else ""


def activation_input(node: Any) -> tuple[Any, str, Any] | None:
    """From the autograd node of a layer's input, back through sign-keeping nodes to an
    activation: ``(activation node, activation, node of the activation's input)``."""
    for _ in range(_WALK):
        if node is None:
            return None
        act = activation_of(node)
        if act:
            nxt = node.next_functions
            return (node, act, nxt[0][0]) if nxt else None
        if not _op(node).startswith(_PASS_OPS) or not node.next_functions:
            return None
        node = node.next_functions[0][0]
    return None


class LayerCollector:
    """Per-window lists of device rows; the hook bodies append to them."""

    def __init__(self, specs: list[LayerSpec], config: Config) -> None:
        self.specs, self.config = specs, config
        self.need = Needs(config.stats)
        self.hist_rows = {i: h for h, i in enumerate(i for i, s in enumerate(specs) if s.hist)}
        self.hist_now = False  # set by the monitor: this window's report carries histograms
        self.device: torch.device | None = None
        self._grad_fns = [self._grad_hook(i) for i in range(len(specs))]
        self._scratch: torch.Tensor | None = None
        self._plans: dict[tuple[int, torch.Size, bool], CallPlan] = {}
        self._indices: dict[tuple[tuple[int, ...], torch.device, int], torch.Tensor] = {}
        self._zero_t: torch.Tensor | None = None
        self._width = 0  # columns of the unit-maxima matrices
        self._ring: torch.Tensor | None = None  # [dead_window, layers, width] past maxima
        self._ring_pos = 0
        self._units = [0] * len(specs)
        self._valid: tuple[tuple[int, ...], torch.Tensor] | None = None
        #: Per layer: the activation that makes its dead units dead units: ``"F.relu"``
        #: for a layer whose output goes into a functional ReLU, ``"relu"`` for a leaf
        #: that computes one itself, ``""`` when the graph showed none (see ``_note_graph``).
        self.activations = [""] * len(specs)
        #: Per layer: the most calls seen in one forward of the model (at least 1).
        self.calls = [1] * len(specs)
        self.structure = 0  # bumped when ``activations`` or ``calls`` change
        # Modules that may return their input itself (dropout with p=0 or in eval mode,
        # identity): their output's node is someone else's.
        self._passive = [isinstance(s.module, (nn.Identity, nn.modules.dropout._DropoutNd))
                         for s in specs]
        self._forward_calls: dict[int, int] | None = None  # this forward's calls per layer
        self._windows = 0  # report windows begun
        self._cpu = True  # the outputs lie on the CPU (set from the first one measured)
        self._where = -1  # ``get_device()`` of the first output measured
        self._mixed = False  # some outputs lie on another device than the first
        self._layout: SummaryLayout | None = None  # the last window's (see ``summary_layout``)
        self._hist_idx: tuple[SummaryLayout, torch.Tensor] | None = None  # its histogram picks
        #: small outputs' batches (see ``neurotop.training.batched_calls``), by plan
        self._batches: dict[tuple[CallPlan, torch.device], CallBatch] = {}
        self._new_window()

    def _new_window(self) -> None:
        #: ROW_COLS values of every call, in order: floats on the CPU (read there at no
        #: cost: the non-finite check reads them anyway), 0-d tensors on a device
        self.rows: list[Any] = []
        self._walk = self._windows < GRAPH_WINDOWS or self._windows % GRAPH_EVERY == 0
        self._windows += 1
        self.samples: list[torch.Tensor] = []
        self.row_layer: list[int] = []
        self.order: list[int] = []  # layers in the order of their first call
        self._seen: set[int] = set()
        #: per unit count c: the calls' partial maxima of their layer's c units
        self.unit_rows: dict[int, UnitRows] = {}
        self.units = [0] * len(self.specs)  # units of each layer's last call measured
        self._reunit = False  # some layer's unit count changed within this window
        self.grad_layer: list[int] = []
        self.grad_samples: list[torch.Tensor] = []  # one per gradient hook call, owned
        #: autograd node of each measured output -> its layer (held until the report, so
        #: that a later node's ``next_functions`` give back the same objects)
        self._out_nodes: dict[Any, int] = {}
        for b in self._batches.values():
            b.drop()

    # -- hook bodies (training thread, report windows only) -------------------------------

    def forward_started(self) -> None:
        """The model's forward pre-hook, in report windows: a new forward's calls count."""
        self._forward_calls = {}

    def on_output(self, i: int, out: Any, args: Any = ()) -> None:
        """Forward hook body: this call's row; hook the output's gradient if asked."""
        t = first_tensor(out)
        if t is None or not t.is_floating_point() or t.numel() == 0:
            return
        spec = self.specs[i]
        if self._forward_calls is not None:
            n = self._forward_calls[i] = self._forward_calls.get(i, 0) + 1
            if n > self.calls[i]:
                self.calls[i] = n
                self.structure += 1
        if self._walk and t.grad_fn is not None:
            self._note_graph(i, t.grad_fn, args)
        if spec.signal and self.need.grad and t.requires_grad and torch.is_grad_enabled():
            t.register_hook(self._grad_fns[i])
        if self.device is None:
            self.device, self._cpu, self._where = t.device, t.device.type == "cpu", t.get_device()
        elif t.get_device() != self._where:  # layers on several devices
            self._mixed = True
        # Detached, so nothing below is recorded by autograd; and none of these kernels is
        # one that autocast changes (matmul-like), so no context managers are needed.
        x = t.detach()
        key = (i, x.shape, x.is_contiguous())
        plan = self._plans.get(key) or self._plan(i, x)
        if i not in self._seen:
            self._seen.add(i)
            self.order.append(i)
        self.row_layer.append(i)
        if plan.numel <= SMALL_OUTPUT:  # measured with the others of its shape, later
            self._defer(i, x, plan)
            return
        if x.dtype != torch.float32:
            x = x.float()
        if self._cpu:
            n = plan.numel
            if self._scratch is None or self._scratch.numel() < n:
                self._scratch = torch.empty(n)
            row, umax, sample = cpu_row(x, plan, self.need, self._scratch)
            self.rows += row
        else:
            row, umax, sample = activation_row(x, plan, self.need, self._zero(x.device), None)
            self.rows += row
        self.samples.append(sample)
        if umax is not None:
            self._keep_max([i], umax)

    def _keep_max(self, layers: list[int], umax: torch.Tensor) -> None:
        """Keep ``[k * len(layers) x units]`` unit maxima, rows ``k * b`` to ``k * b + k - 1``
        of layer ``layers[b]``; the report folds them into each layer's at once
        (``_dead_counts``)."""
        c = umax.shape[1]
        group = self.unit_rows.get(c)
        if group is None:
            group = self.unit_rows[c] = UnitRows()
        group.add(layers, umax)
        for i in set(layers):
            if self.units[i] != c:
                self._reunit |= self.units[i] != 0  # the last count wins (``_dead_counts``)
                self.units[i] = c

    def _defer(self, i: int, x: torch.Tensor, plan: CallPlan) -> None:
        """A small output's copy into its shape's batch; its row and sample are placeholders
        until the batch is measured (when full, or at the report)."""
        key = (plan, x.device)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = CallBatch(plan, x.device)
        at = len(self.samples)
        self.rows += _PENDING_ROW
        self.samples.append(None)
        if batch.add(x, i, at):
            self._measure_batch(batch)

    def _measure_batch(self, batch: CallBatch, owned: bool = True) -> None:
        """Fill in the rows, samples and unit maxima of a batch's pending calls."""
        layers, at, (rows, units, samples) = batch.take(self.need, self._cpu, owned)
        c = len(ROW_COLS)
        for j, k in enumerate(at):
            self.rows[k * c: (k + 1) * c] = rows[j * c: (j + 1) * c]
            self.samples[k] = samples[j]
        if units is not None:
            self._keep_max(layers, units)

    def _note_graph(self, i: int, node: Any, args: Any) -> None:
        """What the autograd graph says about layer ``i``: a leaf whose output is an
        activation's is an activation; and if this call's input comes (through pooling,
        dropout or reshapes) from an activation applied to another measured layer's output
        outside any measured module, that layer is the activation's pre-activation."""
        if not self._passive[i]:
            self._out_nodes[node] = i
        if not self.activations[i] and self.specs[i].kind == "leaf" and not self._passive[i]:
            act = activation_of(node)
            if act:
                self.activations[i] = act
                self.structure += 1
        x = first_tensor(args)
        found = activation_input(x.grad_fn) if x is not None else None
        if found is None:
            return
        act_node, act, src = found
        j = self._out_nodes.get(src)
        if j is not None and act_node not in self._out_nodes and not self.activations[j]:
            self.activations[j] = f"F.{act}"
            self.structure += 1

    def discard(self) -> None:
        """Drop this window's samples (the scaler skipped the step they were for)."""
        self._new_window()

    def dead_units(self, i: int) -> torch.Tensor | None:
        """Layer ``i``'s units never positive over the last ``dead_window`` reports (a bool
        mask on the device; a unit with no number in the window is not dead), or None before
        a report measured them. For ``reset_dead`` (``neurotop.training.unit_reset``)."""
        if self._ring is None or not self._units[i]:
            return None
        w = self._ring[:, i, : self._units[i]]
        return (w.nan_to_num(nan=float("-inf")).amax(0) <= 0) & ~w.isnan().all(0)

    def restart_units(self, i: int, idx: torch.Tensor) -> None:
        """Forget the past maxima of layer ``i``'s units ``idx`` (just re-initialized)."""
        if self._ring is not None and self._units[i]:
            self._ring[:, i, idx.to(self._ring.device)] = float("nan")

    def _grad_hook(self, i: int):
        def hook(g: torch.Tensor) -> None:
            self.on_grad(i, g)
        return hook

    def on_grad(self, i: int, g: torch.Tensor) -> None:
        """Tensor hook body on a layer's output: a row sample of dL/dh (the same rule as for
        activations), kept for its norm and histogram, both taken at pack time."""
        g = g.detach()
        self.grad_samples.append(take_sample(g.reshape(-1), self._plan(i, g)).float())
        self.grad_layer.append(i)

    def _plan(self, i: int, x: torch.Tensor) -> CallPlan:
        """Layer ``i``'s plan for outputs (or gradients) shaped like ``x`` (cached)."""
        key = (i, x.shape, x.is_contiguous())
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64 * len(self.specs):  # shapes that keep changing
                self._plans.clear()
            plan = self._plans[key] = call_plan(
                x.shape, key[2], unit_dim_for(self.specs[i], x.dim()), self.config.sample)
        return plan

    def _zero(self, device: torch.device) -> torch.Tensor:
        """A cached 0-d zero on ``device``: the value of the statistics not computed."""
        if self._zero_t is None or self._zero_t.device != device:
            self._zero_t = torch.zeros((), device=device)
        return self._zero_t

    # -- report ---------------------------------------------------------------------------

    def pack(self, device: torch.device, scale: torch.Tensor | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This window's device tensors and host facts; then a fresh window starts.
        ``scale``: the loss scale the window's backwards used (a GradScaler's), which
        dL/dh is divided by, on the device."""
        for b in self._batches.values():
            if b.layers:  # read below, before a slot is written again: views will do
                self._measure_batch(b, owned=False)
        # a shape no call had this window (sequence lengths that vary) keeps no buffer
        self._batches = {k: b for k, b in self._batches.items() if b.used}
        dev = self.device or device
        c = self.config
        inv = scale.to(dev, torch.float32).reciprocal().reshape(()) if scale is not None else None
        lay = self._summary_layout(dev)
        groups = None if lay is not None else stack_by_size(
            pool_by_layer(self.samples, self.row_layer), dev)
        grad_norms = _stack(torch._foreach_norm(self.grad_samples) if self.grad_samples
                            else [], dev, (0,))
        if self._cpu and self.device is not None:  # floats (see ``rows``): one small copy
            rows = torch.tensor(self.rows, dtype=torch.float32)
        else:
            rows = _stack(self.rows, dev, (0,))
        parts: dict[str, torch.Tensor] = {
            "rows": rows.view(-1, len(ROW_COLS)),
            "summary": (summarize_layout(lay, self.samples, c.eps) if lay is not None
                        else summarize(groups, len(self.specs), c.eps, dev)),
            "grad_norms": grad_norms * inv if inv is not None else grad_norms,
        }
        units = self.units
        if self.need.units and any(units):
            parts["dead"], parts["dead_window"] = self._dead_counts(dev, units)
        if self.hist_now:
            hist = list(self.hist_rows)  # layer indices, in the schema's hist_layers order
            grads = stack_by_size(pool_by_layer(self.grad_samples, self.grad_layer), dev)
            if inv is not None:
                grads = [(idx, a * inv) for idx, a in grads]
            if lay is not None:
                if self._hist_idx is None or self._hist_idx[0] is not lay:
                    self._hist_idx = (lay, hist_layout(lay, hist, c.hist_sample))
                parts["hist"] = hist_counts_at(lay.buf.view(-1).take(self._hist_idx[1]),
                                               c.hist_exponents)
            else:
                parts["hist"] = hist_counts(groups, hist, c.hist_exponents, c.hist_sample, dev)
            parts["grad_hist"] = hist_counts(grads, hist, c.hist_exponents, c.hist_sample,
                                             dev)
        meta: dict[str, Any] = {
            "layers": len(self.specs), "row_layer": self.row_layer, "order": self.order,
            "units": units, "grad_layer": self.grad_layer,
            "grad_elements": [t.numel() for t in self.grad_samples],
            "hist": self.hist_now}
        self._new_window()
        return parts, meta

    def _summary_layout(self, dev: torch.device) -> SummaryLayout | None:
        """This window's ``SummaryLayout`` (the last one, when the calls are the same)."""
        if not self.samples or self._mixed:
            return None
        key = (tuple(self.row_layer), tuple(t.numel() for t in self.samples))
        lay = self._layout
        if lay is None or lay.key != key or lay.buf.device != dev:
            lay = summary_layout(self.row_layer, list(key[1]), len(self.specs), dev)
            if lay is None:
                return None
            self._layout = lay
        return lay

    def _dead_counts(self, dev: torch.device, units: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Units never positive in this window, and over the last ``dead_window`` windows.

        The per-unit maxima of all layers go into one NaN-padded matrix (NaN <= 0 is
        false, so padding never counts), the current slot of a ring of the last windows'
        matrices, which gives the running max. A layer whose unit count changed restarts
        its window.
        """
        nan = float("nan")
        width = max(max(units), self._width)
        if self._ring is None or self._ring.device != dev or width > self._width:
            ring = torch.full((self.config.dead_window, len(self.specs), width), nan,
                              device=dev)
            if self._ring is not None and self._ring.device == dev:
                ring[:, :, : self._width] = self._ring
            self._ring, self._width = ring, width
        for i, u in enumerate(units):
            if u and u != self._units[i]:
                self._ring[:, i].fill_(nan)
                self._units[i] = u
        cur = self._ring[self._ring_pos % self.config.dead_window]
        self._ring_pos += 1
        cur.fill_(nan)
        for c, group in self.unit_rows.items():  # a few kernels per unit count
            layers, m = group.blocks(dev)
            if self._reunit:  # blocks of a layer's earlier unit count: not its units now
                keep = [r for r, i in enumerate(layers) if units[i] == c]
                layers = [layers[r] for r in keep]
                m = m.index_select(0, self._index(keep, dev))
            if not layers:
                continue
            if len(set(layers)) == len(layers):  # one block per layer: copied
                cur[:, :c].index_copy_(0, self._index(layers, dev), m)
            else:  # each layer's maximum over its blocks (NaN propagates, as in amax)
                # (``scatter_reduce_`` on CPU costs ~30 ns a value: run on blocks, not rows)
                idx = self._index(layers, dev, c)
                cur[:, :c].scatter_reduce_(0, idx, m, "amax", include_self=False)
        window = self._ring.nan_to_num(nan=float("-inf")).amax(0)
        return (cur <= 0).sum(1), ((window <= 0) & self._valid_mask(dev, units, width)).sum(1)

    def _index(self, layers: list[int], dev: torch.device, width: int = 0) -> torch.Tensor:
        """``layers`` as an index tensor on ``dev`` (cached), ``[len(layers) x width]`` (each
        row one layer's index repeated: ``scatter_reduce_``'s) when ``width`` is given. On
        CUDA it is copied from pinned memory without waiting: a plain host-to-device copy
        would synchronize."""
        key = (tuple(layers), dev, width)
        idx = self._indices.get(key)
        if idx is None:
            if len(self._indices) > 64:  # call patterns that keep changing
                self._indices.clear()
            idx = to_device(torch.tensor(layers, dtype=torch.long), dev)
            if width:
                idx = idx.view(-1, 1).expand(-1, width)
            self._indices[key] = idx
        return idx

    def _valid_mask(self, dev: torch.device, units: list[int], width: int) -> torch.Tensor:
        """``[layers x width]``: which columns are units this window (cached by layout)."""
        key = (*units, width)
        if self._valid is None or self._valid[0] != key or self._valid[1].device != dev:
            mask = torch.nn.utils.rnn.pad_sequence(
                [torch.ones(u, dtype=torch.bool, device=dev) for u in units],
                batch_first=True, padding_value=False)
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)
            self._valid = (key, mask)
        return self._valid[1]


_PENDING_ROW = [0.0] * len(ROW_COLS)


class UnitRows:
    """One unit count's partial maxima in a window, by rows per block: a call's ``[k x
    units]`` fold is one block of k rows; a batch's ``[calls x units]`` is one block of a
    row per call. Each block is one layer's."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        #: rows per block -> (the layer of each block, in row order; the tensors)
        self.parts: dict[int, tuple[list[int], list[torch.Tensor]]] = {}

    def add(self, layers: list[int], t: torch.Tensor) -> None:
        k = t.shape[0] // len(layers)
        part = self.parts.get(k)
        if part is None:
            part = self.parts[k] = ([], [])
        part[0].extend(layers)
        part[1].append(t)

    def blocks(self, dev: torch.device) -> tuple[list[int], torch.Tensor]:
        """Each block's maxima, ``[blocks x units]``, and the layer of each: the k rows of
        a block reduced by a view (one kernel per k, as fast as a copy)."""
        layers: list[int] = []
        ms: list[torch.Tensor] = []
        for k, (ls, ts) in self.parts.items():
            m = _cat(ts, dev)
            ms.append(m.view(len(ls), k, m.shape[1]).amax(1) if k > 1 else m)
            layers += ls
        return layers, ms[0] if len(ms) == 1 else torch.cat(ms)


def _cat(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """``ts`` (at least one) concatenated on ``dev``; the one tensor itself if alone."""
    ts = [t if t.device == dev else t.to(dev) for t in ts]
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _stack(ts: list[torch.Tensor], dev: torch.device, empty: tuple[int, ...]) -> torch.Tensor:
    """``ts`` stacked on ``dev``: one kernel when all lie there (not one copy per tensor)."""
    if not ts:
        return torch.zeros(empty, device=dev)
    if all(t.device == dev for t in ts):
        return torch.stack(ts)
    return torch.stack([t.to(dev) for t in ts])
