"""Thousands of adapters from one directory, loaded on demand: `serve --adapters-dir`, `--max-loaded`, reloads.

    pytest tests/test_serve_many.py -v

The on-demand path against everything stacked at once (the same probabilities to 1e-6), the LRU order, the
directory walk (names, hidden and linked directories, a broken adapter, 10,000 empty folders), and the
service through FastAPI's TestClient: names that are not in the catalog, reloads (added, removed, rewritten,
half-written adapters, two at once), the listing, the metrics and the token.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from lora_dist import MultiAdapterClassifier, UserError
from lora_dist.infer import adapter_store
from lora_dist.infer.adapter_store import Catalog, Unavailable, walk

sys.path.insert(0, str(ROOT / "bench"))
from fake_adapters import LABELS, make_adapter  # noqa: E402

TEXTS = ["WINNER!! claim your prize now", "see you at 6", "the app crashes when I log in", "x " * 40, "ok"]
TOKEN = "tok-for-many"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep's output layout: DIR/adapters/NAME/adapter/..., mixed ranks, targets and label sets."""
    d = tmp_path_factory.mktemp("many")
    kinds = [
        dict(rank=8, targets=("all",), labels=LABELS["spam"]),
        dict(rank=4, targets=("*.att.*",), labels=LABELS["support"], head=False),
        dict(rank=16, targets=("*.ff.*",), labels=LABELS["lang"], train_head=False),
        dict(rank=2, targets=("all",), labels=LABELS["spam"]),
        dict(rank=8, targets=("all",), labels=LABELS["support"]),
    ]
    for i, kw in enumerate(kinds):
        make_adapter(d / "adapters" / f"run{i}", seed=10 + i, **kw)
    (d / "sweep.json").write_text("{}")
    (d / "adapters" / "run9-unfinished" / "checkpoints").mkdir(parents=True)  # a run still training
    return d


NAMES = [f"adapters/run{i}" for i in range(5)]


@pytest.fixture(scope="module")
def preloaded(sweep):
    return MultiAdapterClassifier.from_pretrained(None, {n: sweep / n for n in NAMES}, device="cpu")


def test_on_demand_gives_the_probabilities_of_everything_preloaded(sweep, preloaded):
    on_demand = MultiAdapterClassifier.from_pretrained(None, sweep, device="cpu", max_loaded=2)
    assert on_demand.names == NAMES  # named by their path under the directory; the unfinished run left out
    assert on_demand.slots is not None and not on_demand.slots.resident  # nothing read at start
    g = torch.Generator().manual_seed(0)
    texts = TEXTS * 5
    which = [NAMES[i] for i in torch.randint(len(NAMES), (len(texts),), generator=g).tolist()]
    want = preloaded.predict(texts, which, batch_size=4)
    for _ in range(2):  # a second round: adapters evicted in the first come back
        got = on_demand.predict(texts, which, batch_size=4)
        for w, o in zip(want, got, strict=True):
            assert o["adapter"] == w["adapter"] and o["label"] == w["label"]
            assert list(o["probs"]) == list(w["probs"])
            assert o["probs"] == pytest.approx(w["probs"], abs=1e-6, rel=0)
    assert len(on_demand.slots.resident) == 2


def test_the_least_recently_used_adapter_is_evicted(sweep):
    m = MultiAdapterClassifier.from_pretrained(None, sweep, device="cpu", max_loaded=3)
    events = []
    m.on = lambda event, name, seconds=0.0: events.append((event, name))
    a, b, c, d = NAMES[:4]
    for name in (a, b, c, a, d):  # b is the least recently used when d comes
        m.predict(["hi"], name)
    assert list(m.slots.resident) == [c, a, d]
    assert ("evict", b) in events and [e for e in events if e[0] == "evict"] == [("evict", b)]
    m.predict(["hi"], b)  # then c
    assert list(m.slots.resident) == [a, d, b]
    assert [n for e, n in events if e == "load"] == [a, b, c, d, b]  # a hit reads nothing


def test_the_walk_names_runs_by_relative_path_skips_links_hidden_dirs_and_is_bounded(sweep, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(sweep / "adapters" / "run0", root / "team-a" / "spam")
    shutil.copytree(sweep / "adapters" / "run3" / "adapter", root / "bare")  # an adapter/ directory itself
    shutil.copytree(sweep / "adapters" / "run1", root / ".tmp-writing")  # hidden: a writer's temporary
    (root / "linked").symlink_to(sweep / "adapters" / "run2", target_is_directory=True)  # out of DIR: not followed
    shutil.copytree(sweep / "adapters" / "run0", root / "bad name!")
    deep = root / "a" / "b" / "c" / "d" / "e" / "f" / "g"
    shutil.copytree(sweep / "adapters" / "run0", deep)
    found, problems = walk(root)
    assert sorted(found) == ["bare", "team-a/spam"]
    assert any("bad name!" in p for p in problems)
    found, problems = walk(root, max_dirs=3)
    assert any("more than 3 directories" in p for p in problems)

    many = tmp_path / "empty"
    for i in range(10_000):
        (many / f"d{i:05d}").mkdir(parents=True)
    shutil.copytree(sweep / "adapters" / "run0", many / "d09999" / "x")
    found, problems = walk(many)
    assert list(found) == ["d09999/x"] and not problems


def test_a_broken_adapter_is_named_in_one_line_and_the_rest_are_served(sweep, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(sweep / "adapters", root)
    (root / "run1" / "adapter" / "adapter_config.json").write_text("{not json")
    other = make_adapter(root / "other-base", seed=5, base_seed=7)  # another random base: left out
    lines: list[str] = []
    c = Catalog(root, log=lines.append)
    diff = c.scan()
    assert sorted(c.entries) == ["run0", "run2", "run3", "run4"]
    assert diff["broken"] == ["other-base", "run1"]
    assert len(lines) == 2 and "'run1' left out" in lines[0] + lines[1] and str(other) in "".join(lines)


def test_a_file_rewritten_while_read_is_refused_never_half_read(sweep, monkeypatch):
    c = Catalog(sweep / "adapters")
    c.scan()
    e = c.entries["run0"]
    stamps = iter([((1, 1, 1),), ((2, 2, 2),)])
    monkeypatch.setattr(adapter_store, "stamp", lambda files: next(stamps))
    from lora_dist.infer.multi_adapter import expected_shapes

    with pytest.raises(Unavailable, match="being rewritten"):
        adapter_store.read_parts(e, expected_shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [2.0, 1.7, 0.3])
def test_b_scaled_off_the_model_thread_is_what_the_stacked_layer_holds_bit_for_bit(dtype, scale):
    """`scaled` (NumPy) gives `b.float() * scale` (what MultiLoRALinear stacks) exactly, in every float dtype."""
    b = (torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    b[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -65000.0]).to(dtype)  # zeros, a tiny number, a large one
    got = adapter_store.scaled(b, scale)
    assert got.dtype == torch.float32 and torch.equal(got, b.float() * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_parse_finds_nan_and_infinity_in_every_float_dtype(dtype, bad):
    from safetensors.torch import save

    good = torch.randn(4, 5).to(dtype)
    tensors = adapter_store.parse(save({"x": good}), "f")
    assert tensors["x"].dtype == dtype and torch.equal(tensors["x"], good)
    damaged = good.clone()
    damaged[3, 4] = bad
    with pytest.raises(UserError, match="tensor 'x' holds NaN or infinite values"):
        adapter_store.parse(save({"x": damaged}), "f")
    with pytest.raises(UserError, match="tensor 'n' is I64; adapters hold floating-point"):
        adapter_store.parse(save({"x": good, "n": torch.ones(2, dtype=torch.long)}), "f")


def test_a_read_parses_and_checks_with_no_torch_compute_op_and_the_slot_gets_plain_copies(sweep, preloaded):
    """The reader thread's part of a miss (`read`: read, parse, check, scale B) runs no torch op that computes
    (only views of the bytes: a torch op on a second thread slows the model thread's, serve/batcher.py); the
    model thread's part (`Slots.put`) copies them, and the slots then hold what stacking the adapters holds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lora_dist.multi_lora import MultiLoRALinear

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m = MultiAdapterClassifier.from_pretrained(None, sweep, device="cpu", max_loaded=5)
    assert m.catalog is not None and m.slots is not None
    from lora_dist.infer.multi_adapter import expected_shapes

    for n in NAMES:  # each structure's tensor shapes, found once (on the meta device) and kept
        expected_shapes(m.catalog.entries[n].spec)
    ops = Ops()
    with ops:
        parts = [m.read(m.catalog.entries[n]) for n in NAMES]
    assert all(p.layers is not None and p.checked and p.data is None for p in parts)
    assert ops.seen <= {"view", "empty", "alias", "detach", "lift_fresh"}, ops.seen  # wrapping, no compute
    with torch.no_grad():
        for p in parts:
            m.slots.put(p, set())
    stacked = {n: x for n, x in preloaded.model.named_modules() if isinstance(x, MultiLoRALinear)}
    for name, layer in m.slots.layers.items():
        for n in NAMES:
            i, j, r = m.slots.slot(n), preloaded.number[n], layer.rank[m.slots.slot(n)]
            assert r == stacked[name].rank[j]
            assert torch.equal(layer.A[i, :, :r], stacked[name].A[j, :, :r]), (name, n)
            assert torch.equal(layer.B[i, :r], stacked[name].B[j, :r]), (name, n)


def test_the_scan_and_the_shapes_lay_models_out_on_meta_without_importing_dynamo(sweep):
    """Start-up reads descriptions and checks them against their base laid out on the meta device: nothing is
    drawn there (a meta normal_ imports torch._dynamo on its first call, 1-5 s of a service's start)."""
    code = (
        "import sys; from pathlib import Path; from lora_dist.infer.adapter_store import Catalog; "
        "from lora_dist.infer.multi_adapter import expected_shapes; "
        f"c = Catalog(Path({str(sweep)!r})); c.scan(); assert len(c.entries) == 5; "
        "[expected_shapes(e.spec) for e in c.entries.values()]; print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_no_adapter_in_the_directory_is_a_user_error(tmp_path):
    (tmp_path / "nothing" / "here").mkdir(parents=True)
    with pytest.raises(UserError, match="no usable adapter"):
        MultiAdapterClassifier.from_pretrained(None, tmp_path / "nothing", device="cpu")


# ------------------------------------------------------------------------------------ the service


@pytest.fixture
def served(sweep, tmp_path):
    """A service over a copy of the sweep (tests change it), 2 slots, with a token; (client, dir, service, log)."""
    from fastapi.testclient import TestClient

    from lora_dist.serve.app import Service, create_app

    root = tmp_path / "served"
    shutil.copytree(sweep, root)
    lines: list[str] = []
    catalog = Catalog(root, log=lines.append)
    catalog.scan()
    service = Service([], device="cpu", token=TOKEN, log=lines.append, catalog=catalog, max_loaded=2)
    with TestClient(create_app(service)) as client:
        client.headers["authorization"] = f"Bearer {TOKEN}"
        end = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end and not service.failed, lines
            time.sleep(0.05)
        yield client, root, service, lines


def classify(client, name, texts=("hi",)):
    return client.post("/v1/classify", json={"adapter": name, "texts": list(texts)})


def test_the_service_answers_as_preloaded_and_says_hit_or_miss(served, preloaded):
    client, _, service, _ = served
    for name in NAMES + NAMES[:1]:
        r = classify(client, name, TEXTS)
        assert r.status_code == 200, r.text
        want = preloaded.predict(TEXTS, name)
        for got, w in zip(r.json()["results"], want, strict=True):
            assert got["probs"] == pytest.approx(w["probs"], abs=1e-6, rel=0)
    assert r.headers["x-adapter-cache"] == "miss"  # run0 was evicted by run2..run4 (2 slots)
    assert classify(client, NAMES[0]).headers["x-adapter-cache"] == "hit"
    m = client.get("/metrics").text
    assert "lora_dist_adapter_cache_hits_total 1.0" in m and "lora_dist_adapter_cache_misses_total 6.0" in m
    assert "lora_dist_adapter_evictions_total 4.0" in m and "lora_dist_adapter_load_seconds_count" in m
    listing = client.get("/v1/adapters", params={"q": "adapters/run", "limit": 3}).json()
    assert [a["name"] for a in listing["adapters"]] == NAMES[:3] and listing["total"] == 5
    assert listing["next_offset"] == 3
    assert listing["adapters"][0]["state"] == "loaded" and listing["adapters"][0]["requests"] == 3
    assert listing["adapters"][1]["state"] == "on disk" and listing["adapters"][1]["labels"] == list(LABELS["support"])
    rest = client.get("/v1/adapters", params={"q": "adapters/run", "limit": 3, "offset": 3}).json()
    assert [a["name"] for a in rest["adapters"]] == NAMES[3:] and rest["next_offset"] is None


@pytest.mark.parametrize("name", ["../adapters/run0", "adapters/../adapters/run0", "/etc/passwd", "adapters/", "run0"])
def test_a_name_is_only_looked_up_never_a_path(served, name):
    client, root, _, _ = served
    r = classify(client, name)
    assert r.status_code == 404 and "unknown adapter" in r.json()["error"]


def test_reload_adds_removes_and_needs_the_token(served, sweep):
    client, root, service, lines = served
    assert classify(client, NAMES[0]).status_code == 200  # resident
    assert client.post("/v1/adapters/reload", headers={"authorization": "Bearer wrong"}).status_code == 401
    shutil.rmtree(root / "adapters" / "run0")
    shutil.copytree(sweep / "adapters" / "run1", root / "new" / "customer")
    assert classify(client, "new/customer").status_code == 404  # not before a reload
    r = client.post("/v1/adapters/reload")
    assert r.status_code == 200 and r.json()["added"] == ["new/customer"] and r.json()["removed"] == [NAMES[0]]
    assert classify(client, NAMES[0]).status_code == 404  # removed: evicted, not listed
    assert NAMES[0] not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert service.model.resident(NAMES[0]) is None
    assert classify(client, "new/customer").status_code == 200
    assert any(x.startswith("reload: 5 adapters (1 added, 1 removed") for x in lines)


def test_a_request_queued_for_an_adapter_a_reload_removes_gets_404(served):
    client, root, service, _ = served
    assert classify(client, NAMES[2]).status_code == 200
    shutil.rmtree(root / "adapters" / "run2")
    assert client.post("/v1/adapters/reload").json()["removed"] == [NAMES[2]]
    # what the model thread meets when a request passed the name check before the reload
    with pytest.raises(adapter_store.Gone):
        client.portal.call(service.batcher.submit, NAMES[2], ["hi"])

    async def hit(name):
        return "hit"

    service.knows, service.prepare = (lambda name: True), hit  # as if let in just before the reload
    r = classify(client, NAMES[2])
    assert r.status_code == 404 and "unknown adapter" in r.json()["error"]


def test_two_reloads_at_once_are_safe(served):
    client, root, service, _ = served
    shutil.copytree(root / "adapters" / "run3", root / "adapters" / "run5")

    async def both():
        return await asyncio.gather(service.reload(), service.reload())

    a, b = client.portal.call(both)
    assert a["added"] == ["adapters/run5"] and b["added"] == []  # one after the other
    assert classify(client, "adapters/run5").status_code == 200


def test_deleted_half_written_and_rewritten_adapters_never_give_a_500(served, sweep):
    client, root, service, lines = served
    run1 = root / "adapters" / "run1" / "adapter" / "adapter_model.safetensors"
    # deleted after the scan, never read: 404
    os.unlink(root / "adapters" / "run2" / "adapter" / "adapter_model.safetensors")
    r = classify(client, NAMES[2])
    assert r.status_code == 404 and "removed from disk" in r.json()["error"]
    # half-written by a sweep: the tensor file cut short
    run1.write_bytes(run1.read_bytes()[:1000])
    r = classify(client, NAMES[1])
    assert r.status_code == 503 and "damaged" in r.json()["error"], r.text
    # the tensors of another adapter under an unchanged description (written before its description)
    shutil.copy(sweep / "adapters" / "run0" / "adapter" / "adapter_model.safetensors", run1)
    r = classify(client, NAMES[1])
    assert r.status_code == 503 and "does not match its description" in r.json()["error"]
    # resident, then rewritten with a broken file and reloaded: the old version answers until it is whole
    good = classify(client, NAMES[3], TEXTS).json()
    run3 = root / "adapters" / "run3" / "adapter" / "adapter_model.safetensors"
    data = run3.read_bytes()
    run3.write_bytes(data[: len(data) // 2])
    assert NAMES[3] in client.post("/v1/adapters/reload").json()["changed"]
    r = classify(client, NAMES[3], TEXTS)
    assert r.status_code == 200 and r.json() == good
    assert any("serving the version loaded before" in x for x in lines)
    # ... and once it is whole again (retrained: other values), the new version
    new = make_adapter(root.parent / "retrained", seed=99, rank=2, targets=("all",), labels=LABELS["spam"])
    shutil.copy(new / "adapter" / "adapter_model.safetensors", run3)
    assert NAMES[3] in client.post("/v1/adapters/reload").json()["changed"]
    r = classify(client, NAMES[3], TEXTS)
    assert r.status_code == 200 and r.json() != good
    assert 'status="500"' not in client.get("/metrics").text
    assert not any("failed in the model" in x for x in lines)


def test_sighup_reloads(served):
    client, root, service, lines = served
    shutil.rmtree(root / "adapters" / "run4")
    service.reload_soon()  # what the SIGHUP handler calls
    end = time.monotonic() + 30
    while not any(x.startswith("reload:") for x in lines):
        assert time.monotonic() < end
        time.sleep(0.05)
    assert classify(client, NAMES[4]).status_code == 404


def test_a_slow_read_does_not_hold_up_requests_for_resident_adapters(served):
    import threading

    client, _, service, _ = served
    assert classify(client, NAMES[0]).status_code == 200  # resident
    model, release, started = service.model, threading.Event(), threading.Event()
    original = model.read

    def slow(e):
        if e.name == NAMES[1]:
            started.set()
            assert release.wait(60)
        return original(e)

    model.read = slow
    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(classify(client, NAMES[1])))
    waiting.start()
    try:
        assert started.wait(60)
        r = classify(client, NAMES[0])  # while NAMES[1] is being read
        assert r.status_code == 200 and r.headers["x-adapter-cache"] == "hit" and not answers
    finally:
        release.set()
        waiting.join(60)
    assert answers[0].status_code == 200 and answers[0].headers["x-adapter-cache"] == "miss"


def test_max_adapter_memory_sets_the_slots(sweep):
    with pytest.raises(UserError, match="holds no adapter; one takes") as e:
        MultiAdapterClassifier.from_pretrained(None, sweep, device="cpu", max_adapter_memory=1)
    per_slot = int(str(e.value).split("one takes ")[1].split()[0])
    m = MultiAdapterClassifier.from_pretrained(None, sweep, device="cpu", max_adapter_memory=3 * per_slot + 1)
    assert m.slots is not None and m.slots.n == 3
    from lora_dist.multi_lora import adapter_bytes

    assert adapter_bytes(m.model) == 3 * per_slot  # the slots hold what the bound says


def test_the_command_wants_adapters_and_a_directory_with_some(tmp_path):
    from argparse import ArgumentParser

    from lora_dist.serve import command

    p = ArgumentParser()
    command.add_arguments(p)
    with pytest.raises(UserError, match="--adapters NAME=PATH,... or --adapters-dir DIR"):
        command.main(p.parse_args([]))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no usable adapter"):
        command.main(p.parse_args(["--adapters-dir", str(tmp_path / "empty")]))
    with pytest.raises(UserError, match="--max-loaded must be >= 1"):
        command.main(p.parse_args(["--adapters-dir", str(tmp_path / "empty"), "--max-loaded", "0"]))


# ------------------------------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def fifty(tmp_path_factory) -> Path:
    """50 adapters in a sweep's layout: adapters/spam-00..24 (ham, spam) and adapters/support-00..24 (billing,
    bug, praise), each its own copy of one of two drawn adapters' files."""
    d = tmp_path_factory.mktemp("fifty")
    drawn = {
        "spam": make_adapter(d / "drawn-spam", seed=1, labels=LABELS["spam"]),
        "support": make_adapter(d / "drawn-support", seed=2, labels=LABELS["support"]),
    }
    for kind, src in drawn.items():
        for i in range(25):
            shutil.copytree(src / "adapter", d / "sweep" / "adapters" / f"{kind}-{i:02d}" / "adapter")
    return d / "sweep"


@pytest.mark.slow  # 12-20 s (a service and a browser): make test runs it, make test-fast not
def test_the_pages_search_box_narrows_the_list_and_the_pick_classifies(fifty, chromium, tmp_path):
    """Headless Chromium on `serve --adapters-dir` with 50 adapters: typing a name's start into "search by name"
    leaves exactly the adapters whose names start so; the one picked classifies as the API does with it."""
    import httpx
    from conftest import cli_env, lora_dist_cmd
    from selenium.webdriver.support.ui import Select, WebDriverWait

    log = tmp_path / "serve.log"
    args = ["serve", "--adapters-dir", str(fifty), "--max-loaded", "4", "--port", "0", "--threads", "1"]
    proc = subprocess.Popen(lora_dist_cmd(*args), cwd=ROOT, env=cli_env(), stderr=log.open("w"))
    try:
        end = time.monotonic() + 120
        while not ("ready: " in (text := log.read_text()) and "serving " in text):  # the model, and the port
            assert proc.poll() is None and time.monotonic() < end, text[-3000:]
            time.sleep(0.05)
        line = next(x for x in log.read_text().splitlines() if x.startswith("serving "))
        url = "http://127.0.0.1:" + line.split(" on http://127.0.0.1:")[1].split("/")[0]

        def shown(b) -> list[str]:  # read at once in the page (the list is rebuilt as the search changes)
            return b.execute_script("return Array.from(document.getElementById('adapter').options, o => o.value)")

        wait = WebDriverWait(chromium, 60)
        chromium.get(url + "/")
        wait.until(lambda b: len(shown(b)) == 50)
        chromium.find_element("id", "find").send_keys("adapters/support-1")
        want = [f"adapters/support-{i}" for i in range(10, 20)]
        wait.until(lambda b: shown(b) == want)
        assert chromium.find_element("id", "count").text == "10 matches"

        Select(chromium.find_element("id", "adapter")).select_by_value("adapters/support-13")
        assert "billing, bug, praise" in chromium.find_element("id", "about").text
        messages = ["my card was charged twice", "the app crashes when I log in"]
        chromium.find_element("id", "texts").send_keys("\n".join(messages))
        chromium.find_element("id", "go").click()
        wait.until(lambda b: len(b.find_elements("css selector", "tr.result")) == len(messages))
        rows = chromium.find_elements("css selector", "tr.result .label")
        page = [(r.text, float(r.get_attribute("data-p"))) for r in rows]
        body = {"adapter": "adapters/support-13", "texts": messages}
        api = httpx.post(url + "/v1/classify", json=body, timeout=60).json()["results"]
        assert [p[0] for p in page] == [r["label"] for r in api]
        assert [p[1] for p in page] == pytest.approx([r["probs"][r["label"]] for r in api], abs=1e-6)
        assert httpx.get(url + "/v1/adapters?q=adapters/support-13").json()["adapters"][0]["state"] == "loaded"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
