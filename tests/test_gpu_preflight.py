"""The GPU check's CPU pre-flight (bench/gpu_preflight.py, issue 32): what would make bench/gpu_check.sh's
figures false on the GPU, or lose them, found before a GPU is lent.

    pytest tests/test_gpu_preflight.py
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_preflight  # noqa: E402


def test_the_pre_flight_passes(capsys):
    """Contenders at the shipped defaults with a few warmed shapes each, a step with no host sync and a bounded
    number of casts, gpt2-xl on the meta device, sweep LoRA in fp32 over a bf16 base, TF32 off again."""
    failed = gpu_preflight.main([])
    out = capsys.readouterr().out
    assert failed == 0, out
    assert out.count("ok: ") >= 30


def test_the_pre_flight_fails_on_a_host_sync(monkeypatch, capsys):
    """The step census sees a `.item()` put back into the step (as the strategy had it: float(norm))."""
    from lora_dist.train import strategy

    step = strategy.Local.step
    monkeypatch.setattr(strategy.Local, "step", lambda self, lr: float(step(self, lr)))
    r = gpu_preflight.Report()
    gpu_preflight.check_step(r)
    assert r.failed == ["eager step: no host sync or data-dependent op ({'aten._local_scalar_dense.default': 1})"]


def test_the_pre_flight_fails_when_the_adapters_are_cast_at_each_use(monkeypatch, capsys):
    """train.lora_cast_once undone (autocast casts A, B and their gradients at each use again): the flag-on step's
    cast count is over its bound, and that is the one failure."""
    from lora_dist.train import strategy

    monkeypatch.setattr(strategy, "cast_adapters_once", lambda model, dtype: 0)
    r = gpu_preflight.Report()
    gpu_preflight.check_step(r)
    (failed,) = r.failed
    assert failed.startswith("captured step with train.lora_cast_once: ")
    assert failed.endswith(f"dtype casts (at most {gpu_preflight.MAX_CASTS_ONCE})")


def test_the_pre_flight_fails_on_a_boolean_mask(capsys):
    """A boolean mask in the step (its size is data: a host sync on a GPU) is caught; integer indexing is not."""
    x = torch.zeros(4, 6)
    with gpu_preflight.StepCensus() as c:
        x[torch.arange(4), torch.tensor([1, 2, 3, 0])]
    assert not c.syncs
    with gpu_preflight.StepCensus() as c:
        x[x > 0]
    assert c.syncs


@pytest.mark.slow
def test_the_dry_run_ships_after_every_step(capsys):
    """bench/gpu_check.sh --dry-run: the plan fits the deadline, $OUT holds the summary and the logs after every
    step, the summary has the issue's fields, every timed shape was warmed up."""
    r = gpu_preflight.Report()
    gpu_preflight.check_dry_run(r)
    assert not r.failed, capsys.readouterr().out
