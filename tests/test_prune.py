"""sweep.prune: successive halving stops the worse adapters at each rung (adapters kept, marked pruned), queued
adapters take their slots, and the adapters that run to the end equal their config trained alone."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SMOKE, read_metrics, run_cli
from test_distributed import results
from test_sweep import assert_same_runs

from lora_dist.errors import UserError
from lora_dist.train.sweep_config import PruneConfig, load_sweep

SHORT = ("train.max_steps=16", "train.eval_every=50", "train.eval_batches=2", "tracking.wandb.mode=disabled")
PRUNE = {"method": "successive_halving", "min_steps": 4, "eta": 2, "metric": "val_loss"}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """(the config without its sweep section, a 4-adapter pruned sweep of it, 2 at a time) over 200 SMS messages."""
    from lora_dist.data import read_sms, shipped_sms_path

    d = tmp_path_factory.mktemp("prune-configs")
    read_sms(shipped_sms_path()).groupby("label").head(100)[["text", "label"]].to_csv(d / "small.csv", index=False)
    base = yaml.safe_load(SMOKE.read_text())
    base["data"]["source"] = str(d / "small.csv")
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"lora.rank": [2, 8], "train.lr": [1.0e-4, 2.0e-3]}
    sweep = {"grid": grid, "max_concurrent": 2, "prune": PRUNE}
    (d / "sweep.yaml").write_text(yaml.safe_dump({**base, "sweep": sweep}))
    return d / "base.yaml", d / "sweep.yaml"


def test_rungs_and_bad_prune_settings(tmp_path):
    assert PruneConfig(min_steps=4, eta=2).rungs(16) == [4, 8]
    assert PruneConfig(min_steps=10, eta=3).rungs(130) == [10, 30, 90] and PruneConfig(min_steps=50).rungs(50) == []
    assert PruneConfig().direction == "min" and PruneConfig(metric="val_macro_f1").direction == "max"
    f = tmp_path / "s.yaml"
    for bad, word in (({"eta": 1}, "eta must be >= 2"), ({"min_steps": 0}, "min_steps must be >= 1")):
        f.write_text(yaml.safe_dump({"sweep": {"grid": {"lora.rank": [2, 4]}, "prune": bad}}))
        with pytest.raises(UserError, match=word):
            load_sweep(f)
    f.write_text(yaml.safe_dump({"sweep": {"grid": {"lora.rank": [2, 4]}, "prune": {"method": "hyperband"}}}))
    with pytest.raises(UserError, match="sweep.prune.method must be one of successive_halving"):
        load_sweep(f)


@pytest.mark.slow  # a sweep, and its surviving adapters trained alone
def test_pruned_sweep(configs, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli("sweep", "--config", str(configs[1]), f"output_dir={out}", *SHORT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["adapters"]}
    pruned = {n: e for n, e in entries.items() if e["status"] == "pruned"}
    done = {n: e for n, e in entries.items() if e["status"] == "done"}
    assert len(entries) == 4 and len(pruned) + len(done) == 4 and pruned and done, entries  # none left queued
    # each adapter's rung evaluations, from its own metrics: who reached which rung with which validation loss
    rungs: dict[int, dict[str, float]] = {}
    for n in entries:
        for m in read_metrics(out / "adapters" / n):
            if m.get("event") == "rung":
                rungs.setdefault(m["step"], {})[n] = m["rung_val_loss"]
    assert set(rungs) <= {4, 8} and len(rungs[4]) == 4  # every adapter is judged at the first rung
    for n, e in pruned.items():
        step = e["pruned"]["step"]
        # it stopped there, its adapter kept: a run of `step` steps that the other commands take
        assert step in rungs and results(out / "adapters" / n)["steps"] == step
        assert (out / "adapters" / n / "adapter" / "adapter_model.safetensors").is_file()
        # an adapter that went on past that rung had a lower validation loss there
        went_on = [v for m, v in rungs[step].items() if m not in pruned or pruned[m]["pruned"]["step"] > step]
        assert went_on and min(went_on) < rungs[step][n], (n, rungs)
        assert e["pruned"]["val_loss"] == rungs[step][n]
    for n in done:
        assert results(out / "adapters" / n)["steps"] == 16
    md = (out / "sweep.md").read_text()
    assert "Pruned by successive halving" in md and all(f"- {n}: step" in md for n in pruned)
    # the adapters that run to the end: each one as its config trained alone
    for n, e in done.items():
        alone = tmp_path / f"alone-{n}"
        proc = run_cli("train", "--config", str(configs[0]), *e["overrides"], f"output_dir={alone}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_runs(out / "adapters" / n, alone)
