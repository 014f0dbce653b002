"""Checkpoints: atomic, verified, pruned, and a corrupt one is named and skipped."""

import json
from pathlib import Path

import pytest
import torch

from lora_dist import UserError
from lora_dist.train import checkpoint as ckpt

# what the training loop saves beside the tensors (train/loop.py, save_checkpoint)
META = {"step": 1, "epoch": 0, "step_in_epoch": 1, "examples_seen": 8, "tokens_seen": 100, "train_seconds": 1.5}


def _write(run_dir, step, keep=2, value=1.0):
    staging = ckpt.staging_dir(run_dir, step)
    ckpt.begin(staging)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return ckpt.commit(
        staging,
        adapter={"a.lora.A": torch.full((2, 2), value)},
        optimizer=opt.state_dict(),
        rng_states=[ckpt.rng_state()],
        meta={**META, "step": step, "step_in_epoch": step, "examples_seen": 8 * step},
        keep=keep,
    )


def test_commit_verify_and_prune(tmp_path):
    for step in (10, 20, 30):
        _write(tmp_path, step, value=step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]
    path, state = ckpt.latest_valid(tmp_path)
    assert path.name == "step-00000030" and state["step"] == 30
    assert torch.equal(ckpt.load_tensors(path, "adapter.safetensors")["a.lora.A"], torch.full((2, 2), 30.0))
    sd = ckpt.optimizer_state(path, state["optimizer"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.load_state_dict(sd)
    # AdamW after one step on gradient 1 (betas 0.9, 0.999): m = (1 - 0.9) * 1, v = (1 - 0.999) * 1^2.
    saved = opt.state_dict()["state"][0]
    assert float(saved["step"]) == 1.0
    assert torch.allclose(saved["exp_avg"], torch.full((3,), 0.1), rtol=1e-6, atol=0)
    assert torch.allclose(saved["exp_avg_sq"], torch.full((3,), 0.001), rtol=1e-6, atol=0)


def test_half_written_checkpoint_is_never_taken(tmp_path):
    _write(tmp_path, 10)
    staging = ckpt.staging_dir(tmp_path, 20)  # a crash mid-write leaves only the staging directory
    ckpt.begin(staging)
    (staging / "adapter.safetensors").write_bytes(b"partial")
    path, _ = ckpt.latest_valid(tmp_path)
    assert path.name == "step-00000010"


def _edit_state(path, change):
    state = json.loads((path / "state.json").read_text())
    change(state)
    (path / "state.json").write_text(json.dumps(state))


# state.json edited as no run writes it: each makes the checkpoint corrupt (the tampering cases)
TAMPERED = {
    "bad_rng": lambda s: s["rng"][0].update(python=[3, [1, 2, 3], None]),
    "numpy_rng_not_a_list": lambda s: s["rng"][0].update(numpy=["MT19937", "abc", 0, 0, 0.0]),
    "negative_step": lambda s: s.update(step=-5),
    "step_1e12": lambda s: s.update(step=1e12),
    "step_a_string": lambda s: s.update(step="20"),
    "file_outside": lambda s: s["files"].update({"../" * 40 + "etc/passwd": "0" * 64}),  # /etc/passwd from anywhere
    "absolute_file": lambda s: s["files"].update({"/etc/passwd": "0" * 64}),
    "no_adapter": lambda s: s["files"].pop("adapter.safetensors"),
    "nested_deep": None,  # state.json of 100,000 nested lists
}


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "bad_json", "delete_file", *TAMPERED])
def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, damage, monkeypatch):
    _write(tmp_path, 10, keep=3)
    newest = _write(tmp_path, 20, keep=3)
    if damage == "truncate":
        f = newest / "adapter.safetensors"
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "delete_state":
        (newest / "state.json").unlink()
    elif damage == "bad_json":
        (newest / "state.json").write_text("{")
    elif damage == "delete_file":
        (newest / "rng.safetensors").unlink()
    elif damage == "nested_deep":
        (newest / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        _edit_state(newest, TAMPERED[damage])
    hashed = []
    real = ckpt.sha256
    monkeypatch.setattr(ckpt, "sha256", lambda p: hashed.append(Path(p)) or real(p))
    said = []
    path, _ = ckpt.latest_valid(tmp_path, say=said.append)
    assert path.name == "step-00000010"
    assert len(said) == 1 and "step-00000020" in said[0] and "falling back" in said[0]
    with pytest.raises(UserError, match="step-00000020"):
        ckpt.verify(newest)
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in hashed), hashed  # nothing outside is read


def test_rng_round_trip(tmp_path):
    torch.manual_seed(3)
    path = _write(tmp_path, 5)
    expected = torch.rand(4)
    torch.manual_seed(99)
    ckpt.restore_rng(path, json.loads((path / "state.json").read_text()), rank=0)
    assert torch.equal(torch.rand(4), expected)


def _state(path):
    return json.loads((path / "state.json").read_text())


def _draw(path, rank, world, said):
    torch.manual_seed(99)
    ckpt.restore_rng(path, _state(path), rank=rank, world=world, say=said.append)
    return tuple(torch.rand(3).tolist())


def test_rng_on_more_ranks_than_saved_is_distinct_per_rank_and_said(tmp_path):
    """A checkpoint of 2 ranks resumed on 4: ranks 2 and 3 get states of their own (not ranks 0 and 1's)."""
    staging = ckpt.staging_dir(tmp_path, 1)
    ckpt.begin(staging)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.rng_state())
    path = ckpt.commit(staging, adapter={"a": torch.ones(1)}, optimizer=None, rng_states=states, meta=META, keep=2)
    said = []
    draws = [_draw(path, r, 4, said) for r in range(4)]
    assert len(set(draws)) == 4, draws
    assert draws == [_draw(path, r, 4, []) for r in range(4)]  # the same on every resume
    assert said and all("2 rank(s), this run has 4" in m for m in said)
    quiet = []
    assert _draw(path, 1, 2, quiet) == draws[1] and not quiet  # same world size: exact, and nothing to say


def test_cuda_rng_with_another_gpu_count_is_derived_and_said(tmp_path, monkeypatch):
    torch.manual_seed(3)
    path = _write(tmp_path, 5)  # written without CUDA: no CUDA states
    seeded = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored states of another GPU count")
    )
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    said = []
    ckpt.restore_rng(path, _state(path), rank=0, world=1, say=said.append)
    assert len(said) == 1 and "CUDA random states for 0 GPU(s)" in said[0] and "shows 2" in said[0]
    assert len(seeded) == 1


def test_resume_argument(tmp_path):
    assert ckpt.resolve("never", tmp_path) is None
    assert ckpt.resolve("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="not a checkpoint directory"):
        ckpt.resolve(str(tmp_path / "nope"), tmp_path)
