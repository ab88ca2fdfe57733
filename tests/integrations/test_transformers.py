"""``neurotop.integrations.transformers.NeurotopCallback`` on a real Hugging Face ``Trainer``
(CPU, a tiny GPT-2 built from its config, synthetic tokens, no downloads): gradient
accumulation, ``max_grad_norm`` clipping and evaluation inside report windows. An operator
lists the run with ``neurotop ls``, sets the learning rate, pauses, resumes and stops it
over the control socket; the reports are checked against a plain forward hook and against
what the Trainer itself logs (its loss and its pre-clip gradient norm)."""

from __future__ import annotations

import copy
import os
import time
import uuid

import pytest
import torch

from tests.helpers.reports import Reports
from tests.integrations.operator import Capture, Operator, StepProbe, approx

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: the model comes from a config
transformers = pytest.importorskip("transformers")
from neurotop.integrations.transformers import NeurotopCallback  # noqa: E402

pytestmark = pytest.mark.slow
VOCAB, SEQ, BATCH, ACCUMULATE = 64, 16, 4, 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Probe(transformers.TrainerCallback):
    """Before neurotop's callback: a step probe on the optimizer Accelerate wraps, what the
    Trainer logs per step, and a short sleep per step (two loaded cores are shared with the
    operator's CLI)."""

    def __init__(self) -> None:
        self.steps: StepProbe | None = None
        self.logs: dict[int, dict] = {}
        self.copy: torch.nn.Module | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.steps = StepProbe(optimizer.optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:  # an EMA or reference copy, made while watched
            self.copy = copy.deepcopy(model)
        time.sleep(0.01)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs[state.global_step] = logs


class Subscribe(transformers.TrainerCallback):
    """After neurotop's callback: subscribed to the run before its first step."""

    def __init__(self, cb: NeurotopCallback) -> None:
        self.cb, self.reports = cb, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.reports = Reports(self.cb.monitor)


def test_trainer_with_accumulation_clipping_and_evaluation(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    probe = Probe()
    steps = lambda: probe.steps.steps if probe.steps else 0  # noqa: E731
    capture = Capture(model.transformer.h[0].mlp.act, steps, 12)
    run_id = f"hf-{uuid.uuid4().hex[:8]}"
    cb = NeurotopCallback(run_id=run_id, report_every=1, record=False, sample=1 << 14)
    sub = Subscribe(cb)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5000, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE, max_grad_norm=0.01, learning_rate=1e-3,
        lr_scheduler_type="constant", eval_strategy="steps", eval_steps=3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(64, 0),
                                   eval_dataset=Tokens(8, 1), callbacks=[probe, cb, sub])
    op = Operator(run_id, steps, "lr", 5e-3)
    op.start()
    trainer.train()
    op.result()
    mon = cb.monitor
    assert mon.step == steps() == trainer.state.global_step < 5000
    assert probe.copy is not None and probe.copy(**Tokens(2, 3)[:2]).loss.isfinite()
    op.check(probe.steps.lrs, 1e-3, mon.step)

    s = capture.window_with_validation()  # an evaluation ran inside this report's window
    assert len(capture.train[s]) == ACCUMULATE
    got = sub.reports.stats(s)
    sub.reports.close()
    capture.check(got.layer("transformer.h.0.mlp.act"), s, mon.config.sample, mon.config.eps)
    sc, logged = got.scalars, probe.logs[s]
    assert sc["loss"] == approx(logged["loss"]), "not the loss the Trainer logs"
    assert sc["grad_norm"] == approx(logged["grad_norm"]) and sc["grad_norm"] > 0.05, \
        "not the gradient norm before the 0.01 clip"
    assert sc["samples_per_s"] == approx(BATCH * ACCUMULATE * sc["steps_per_s"]), \
        "evaluation samples counted"
