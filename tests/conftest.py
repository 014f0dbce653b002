"""Shared fixtures. Tests never touch the network; multi-process tests use gloo on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

# No test may reach the network or a real W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The token cache (and a downloaded SMS file) of this test session, not the user's ~/.cache.
os.environ.setdefault("LORA_DIST_CACHE", tempfile.mkdtemp(prefix="lora-dist-cache-"))
# Under pytest-xdist (`make test` runs `pytest -n auto`) the workers share the cores: each one's in-process
# torch gets its share, so that N workers do not run N x cores threads. Set before any test imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}})
    return env


def lora_dist_cmd(*args: str) -> list[str]:
    """`python -m lora_dist ARGS` as an argument list."""
    return [sys.executable, "-m", "lora_dist", *args]


def torchrun_cmd(nproc: int, *args: str, extra: tuple = ()) -> list[str]:
    """`torchrun --nproc_per_node=N [EXTRA] -m lora_dist ARGS` on the loopback, as an argument list."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d"]
    return [*run, "--rdzv-endpoint=127.0.0.1:0", *extra, "-m", "lora_dist", *args]


def train_args(out, *overrides: str) -> list[str]:
    """`train --config configs/smoke.yaml output_dir=OUT OVERRIDES`."""
    return ["train", "--config", str(SMOKE), f"output_dir={out}", *overrides]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, input: str | None = None):
    """`python -m lora_dist ARGS` in a subprocess (as a user would run it)."""
    return subprocess.run(
        lora_dist_cmd(*args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        input=input,
    )


def torchrun(nproc: int, *args: str, timeout: float = 300, extra: tuple = (), env: dict | None = None):
    return subprocess.run(
        torchrun_cmd(nproc, *args, extra=extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def chromium():
    """Headless Chromium (Selenium) that can reach this machine's loopback and nothing else: every other
    host name fails to resolve, so a page that needs a CDN shows it (the service's page: test_serve.py,
    test_serve_many.py)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium is missing (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,700",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    b = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny GPT-2 written in the hub's layout (config.json + model.safetensors)."""
    import torch

    from lora_dist import load_gpt2, save_hf_checkpoint

    torch.manual_seed(0)
    return save_hf_checkpoint(load_gpt2("tiny", weights="random"), tmp_path_factory.mktemp("tiny-gpt2"))


def shared_across_workers(tmp_path_factory, name: str, make) -> Path:
    """A directory that `make(dir)` fills once per test session, however many pytest-xdist workers ask for
    it: the first worker makes it under a lock in the session's common temporary directory, the others wait
    and read it. Without xdist it is an ordinary session directory."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-USER/pytest-N/popen-gwK -> pytest-N: the same for every worker
    target, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            make(target)
            done.touch()
    return target


def shared_train(tmp_path_factory, name: str, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`lora-dist train --config configs/smoke.yaml OVERRIDES` in a subprocess, once per session whatever the
    number of pytest-xdist workers: (run directory, finished process). A failed run fails every test that
    asks for it, without being retried."""

    def train(d: Path) -> None:
        proc = run_cli("train", "--config", str(SMOKE), f"output_dir={d / 'run'}", *overrides, timeout=600)
        (d / "process.json").write_text(
            json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
        )

    d = shared_across_workers(tmp_path_factory, name, train)
    proc = subprocess.CompletedProcess(**json.loads((d / "process.json").read_text()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run", proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke config trained once for the whole session, as a user runs it (one process, the full 3
    epochs): (run directory, finished process). Tests that only read a finished run share it; a test that
    changes a file in it puts the file back. Under pytest-xdist every worker shares the one run."""
    return shared_train(tmp_path_factory, "smoke")


# Messages of mixed lengths and kinds, for the inference tests.
SAMPLE_TEXTS = [
    "WINNER!! Claim your £900 prize now",
    "see you at 6",
    "Ok lar... Joking wif u oni...",
    "URGENT! Call 09061701461 now to claim your cash",
    "my invoice is wrong again",
    "",
]


# What the Slurm templates and the container image train (their jobs append it to configs/smoke.yaml): one
# epoch, a third of the smoke config's, because what they check is that the job reproduces a plain run.
BASELINE_ARGS = ("train.epochs=1",)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> dict:
    """results.json of the smoke config with BASELINE_ARGS on the host, one process, without Slurm or
    containers: what the Slurm templates and the container image must reproduce (tests/test_slurm.py,
    tests/test_docker.py). Made once, whatever the number of pytest-xdist workers."""
    run, _ = shared_train(tmp_path_factory, "baseline", *BASELINE_ARGS)
    return json.loads((run / "results.json").read_text())


# ------------------------------------------------------------------------- CI: no unexpected skips
# In CI (.ci/run sets LORA_DIST_CI=1: root, Debian, its packages installed) every test can run, so a skip
# means something is broken (a missing package, a daemon that did not start). Only tests marked
# @pytest.mark.gpu may skip there; any other skip, at collection or in a test, is reported as a failure.


def _ci() -> bool:
    return os.environ.get("LORA_DIST_CI") == "1"


def _unexpected_skip(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return f"skipped in CI, where only @pytest.mark.gpu tests may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        report.outcome, report.longrepr = "failed", _unexpected_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped:
        report.outcome, report.longrepr = "failed", _unexpected_skip(report)


# ----------------------------------------------------------------------- pytest-xdist: the longest first
# `make test` runs `pytest -n auto --dist loadfile`: each file runs whole on one worker, so its module
# fixtures (a Slurm cluster, a Docker image, shared training runs) are made once. These files take the
# longest, much of it waiting on daemons and subprocesses: started first, they overlap with the rest instead
# of leaving one worker to finish them alone.
LONGEST_FIRST = ("test_docker.py", "test_slurm.py", "test_distributed.py", "test_deepspeed.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
