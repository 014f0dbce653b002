"""`lora-dist serve` over real HTTP on loopback: answers, every error, auth, batching, SIGTERM, the page.

    pytest tests/test_serve.py -v

Two services run as subprocesses on free ports for the whole module: "open" (no auth, small limits) and
"locked" (a token, and a batch that waits 10 minutes for more requests: only a SIGTERM runs it, so
the requests it holds are in flight for sure when the signal comes).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fastapi  # noqa: E402,F401  (the [serve] extra and httpx from [dev]: a broken install fails, not skips)
import httpx  # noqa: E402
import pytest
from conftest import ROOT, cli_env

sys.path.insert(0, str(ROOT / "bench"))
from fake_adapters import LABELS, make_adapter  # noqa: E402

TOKEN = "s3cret-token-for-tests"
TEXTS = [
    "WINNER!! Claim your £900 prize now",
    "see you at 6",
    "Ok lar... Joking wif u oni...",
    "URGENT! Call 09061701461 now to claim your cash",
    "my invoice is wrong again",
    "",
    "I'll be home soon, want anything from the shop?",
    "the app crashes when I log in",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, adapters: dict, *args: str, env: dict | None = None, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        spec = ",".join(f"{k}={v}" for k, v in adapters.items())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_dist", "serve", "--adapters", spec, "--port", str(self.port), *args],
            cwd=ROOT,
            env=env or cli_env(),
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )

    def wait_ready(self, timeout: float = 180) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the service exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-adapters")
    return {
        "spam": make_adapter(d / "spam", seed=1, rank=8, labels=LABELS["spam"]),
        "support": make_adapter(d / "support", seed=2, rank=4, targets=("*.att.*",), labels=LABELS["support"]),
        "lang": make_adapter(d / "lang", seed=3, rank=16, targets=("*.ff.*",), labels=LABELS["lang"]),
    }


@pytest.fixture(scope="module")
def servers(adapters, tmp_path_factory):
    """Both services start at once (each takes seconds to import and build)."""
    d = tmp_path_factory.mktemp("serve-logs")
    (d / "token").write_text(TOKEN + "\n")
    started = {
        "open": Server(
            adapters,
            "--max-wait-ms",
            "20",
            "--max-texts",
            "8",
            "--max-chars",
            "300",
            "--max-body-bytes",
            "6000",
            log=d / "open.log",
        ),
        "locked": Server(
            {"spam": adapters["spam"]},
            "--token-file",
            str(d / "token"),
            "--max-wait-ms",
            "600000",
            "--max-batch",
            "1000",
            log=d / "locked.log",
        ),
    }
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def open_server(servers):
    return servers["open"].wait_ready()


@pytest.fixture(scope="module")
def locked(servers):
    return servers["locked"].wait_ready()


@pytest.fixture(scope="module")
def truth(adapters):
    """What each adapter alone gives, through Classifier (the reference for every answer)."""
    from lora_dist import Classifier

    clfs = {n: Classifier.from_pretrained(p, device="cpu", precision="fp32") for n, p in adapters.items()}
    return lambda name, texts: clfs[name].predict(texts)


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/classify", json=body, timeout=60, **kw)


def same(answer: dict, expected: list[dict]) -> None:
    assert [r["label"] for r in answer["results"]] == [e["label"] for e in expected]
    for r, e in zip(answer["results"], expected, strict=True):
        assert list(r["probs"]) == list(e["probs"]) and r["probs"] == pytest.approx(e["probs"], abs=1e-5)


# ------------------------------------------------------------------------------------------ answers


def test_batcher_gathers_concurrent_requests_and_returns_each_its_own():
    """In-process, no timing: a batch that fills runs at once; one that would overflow waits for the next."""
    from lora_dist.serve.batcher import Batcher

    calls = []

    def run(texts, adapters):
        calls.append(list(zip(adapters, texts, strict=True)))
        if "boom" in texts:
            raise RuntimeError("model failed")
        return [f"{a}:{t}" for a, t in zip(adapters, texts, strict=True)]

    async def scenario():
        b = Batcher(run, max_batch=8, max_wait_ms=600_000)  # waits "forever" unless full or flushed
        b.start()
        reqs = [(f"a{i % 3}", [f"t{i}"]) for i in range(8)]
        got = await asyncio.gather(*(b.submit(a, t) for a, t in reqs))
        assert got == [[f"{a}:{t[0]}"] for a, t in reqs] and len(calls) == 1 and len(calls[0]) == 8
        three = asyncio.ensure_future(b.submit("x", ["1", "2", "3"]))
        six = asyncio.ensure_future(b.submit("y", list("abcdef")))
        while b.queued:
            await asyncio.sleep(0)
        b.flush()
        assert await three == ["x:1", "x:2", "x:3"] and await six == [f"y:{c}" for c in "abcdef"]
        assert [len(c) for c in calls[1:]] == [3, 6]
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit("z", ["boom"])
        await b.stop()

    asyncio.run(scenario())


def test_loading_and_every_batch_run_on_the_one_model_thread(monkeypatch):
    """Each thread that runs torch gets its own OpenMP team, and two teams on 2 cores made every forward pass
    3-6x slower (lora_dist/batcher.py). So the model is built, warmed up and run on one thread only."""
    from fastapi.testclient import TestClient

    from lora_dist.infer import multi_adapter
    from lora_dist.serve.app import Service, create_app

    threads = []

    class Model:
        device, precision = "cpu", "fp32"

        def predict(self, texts, adapters, batch_size=None):
            threads.append(("predict", threading.get_ident()))
            return [{"label": "ham", "probs": {"ham": 1.0}} for _ in texts]

    def from_loaded(*args, **kwargs):
        threads.append(("load", threading.get_ident()))
        return Model()

    monkeypatch.setattr(multi_adapter.MultiAdapterClassifier, "from_loaded", staticmethod(from_loaded))
    loaded = [SimpleNamespace(name="spam", spec=None)]
    with TestClient(create_app(Service(loaded, log=lambda msg: None))) as client:
        end = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        for _ in range(3):
            assert client.post("/v1/classify", json={"adapter": "spam", "texts": ["hi"]}).status_code == 200
    assert [what for what, _ in threads] == ["load", "predict", "predict", "predict", "predict"], threads
    assert len({ident for _, ident in threads}) == 1 and threads[0][1] != threading.get_ident(), threads


def test_classify_answers_what_predict_gives(open_server, truth):
    r = post(open_server, {"adapter": "support", "texts": TEXTS[:5]})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == "support"
    same(r.json(), truth("support", TEXTS[:5]))


def test_adapters_health_ready_metrics_and_schema(open_server):
    got = httpx.get(open_server.url + "/v1/adapters").json()["adapters"]
    assert [(a["name"], a["labels"]) for a in got] == [
        (n, list(LABELS[k])) for n, k in (("spam", "spam"), ("support", "support"), ("lang", "lang"))
    ]
    assert all("random weights (seed 123)" in a["base"] for a in got)
    assert httpx.get(open_server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(open_server.url + "/readyz").json()["status"] == "ready"
    schema = httpx.get(open_server.url + "/openapi.json").json()
    assert "/v1/classify" in schema["paths"] and "ClassifyRequest" in schema["components"]["schemas"]
    post(open_server, {"adapter": "lang", "texts": ["bonjour"]})
    text = httpx.get(open_server.url + "/metrics").text
    for series in (
        'lora_dist_requests_total{adapter="lang",status="200"}',
        'lora_dist_request_seconds_bucket{adapter="lang"',
        "lora_dist_batch_size_bucket",
        'lora_dist_batch_rows_count{adapter="lang"}',
        "lora_dist_queued_requests",
    ):
        assert series in text, series


@pytest.mark.parametrize(
    "make, status, message",
    [
        (lambda: {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        (lambda: {"json": {"texts": ["x"]}}, 422, "adapter: Field required"),
        (lambda: {"json": {"adapter": "spam", "texts": "one string"}}, 422, "texts: Input should be a valid list"),
        (lambda: {"json": {"adapter": "spam", "texts": [1]}}, 422, "texts.0: Input should be a valid string"),
        (
            lambda: {"json": {"adapter": "spam", "texts": ["x"], "path": "/etc"}},
            422,
            "path: Extra inputs are not permitted",
        ),
        (lambda: {"json": {"adapter": "spam", "texts": []}}, 422, "texts is empty"),
        (
            lambda: {"json": {"adapter": "nope", "texts": ["x"]}},
            404,
            "unknown adapter 'nope'; this service has spam, support, lang",
        ),
        (lambda: {"json": {"adapter": "spam", "texts": ["x"] * 9}}, 413, "9 texts in one request; the limit is 8"),
        (
            lambda: {"json": {"adapter": "spam", "texts": ["x" * 301]}},
            413,
            "texts[0] has 301 characters; the limit is 300",
        ),
        (
            lambda: {"json": {"adapter": "spam", "texts": ["y" * 290] * 8, "pad": "z" * 4000}},
            413,
            "the body is over 6000 bytes",
        ),
        (
            lambda: {
                "content": iter([b'{"adapter": "spam", "texts": ["', b"w" * 7000, b'"]}']),
                "headers": {"content-type": "application/json"},
            },
            413,
            "the body is over 6000 bytes",
        ),  # chunked
    ],
    ids=[
        "bad-json",
        "no-adapter",
        "texts-string",
        "text-number",
        "extra-field",
        "empty",
        "unknown-adapter",
        "too-many-texts",
        "text-too-long",
        "body-too-large",
        "chunked-too-large",
    ],
)
def test_errors_say_what_was_wrong(open_server, make, status, message):
    r = httpx.post(open_server.url + "/v1/classify", timeout=60, **make())
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_unknown_paths_and_methods(open_server):
    r = httpx.get(open_server.url + "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint /v1/nothing" in r.json()["error"]
    r = httpx.get(open_server.url + "/v1/classify")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]
    # the errors are counted, the adapter named where it is a loaded one (this test's own two errors:
    # it must not depend on which other tests ran first, or on the same worker)
    httpx.post(open_server.url + "/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    httpx.post(open_server.url + "/v1/classify", json={"adapter": "spam", "texts": ["x"] * 9})
    text = httpx.get(open_server.url + "/metrics").text
    assert 'lora_dist_errors_total{adapter="-",reason="bad_json"}' in text
    assert 'lora_dist_errors_total{adapter="spam",reason="too_many_texts"}' in text


def test_32_concurrent_clients_with_mixed_adapters_get_their_own_answers(open_server, truth):
    rng = random.Random(0)
    jobs = [
        [(rng.choice(["spam", "support", "lang"]), rng.sample(TEXTS, rng.randint(1, 4))) for _ in range(2)]
        for _ in range(32)
    ]

    async def client(job):
        async with httpx.AsyncClient(base_url=open_server.url, timeout=120) as c:
            return [(await c.post("/v1/classify", json={"adapter": a, "texts": t})) for a, t in job]

    async def everyone():
        return await asyncio.gather(*(client(job) for job in jobs))

    answers = asyncio.run(everyone())
    for job, replies in zip(jobs, answers, strict=True):
        for (adapter, texts), r in zip(job, replies, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["adapter"] == adapter
            same(r.json(), truth(adapter, texts))


# --------------------------------------------------------------------------------------------- auth


def test_auth_off_needs_no_token(open_server):
    assert httpx.get(open_server.url + "/v1/adapters").status_code == 200


def test_auth_on_needs_the_bearer_token(locked):
    r = httpx.get(locked.url + "/v1/adapters")
    assert r.status_code == 401 and "no Authorization header" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(locked.url + "/v1/adapters", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]
    r = post(locked, {"adapter": "spam", "texts": ["x"]}, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    r = httpx.get(locked.url + "/v1/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["adapters"][0]["name"] == "spam"
    assert httpx.get(locked.url + "/healthz").status_code == 200  # probes need no token


def test_bad_arguments_and_the_token_from_the_environment(adapters, tmp_path, capsys, monkeypatch):
    """A bad --adapters or --token-file is one error line before anything starts; LORA_DIST_TOKEN works
    like --token-file."""
    from lora_dist.cli import main
    from lora_dist.serve.command import read_token

    for args, message in (
        (["--token-file", str(tmp_path / "missing")], "error: --token-file"),
        (["--max-batch", "0"], "error: --max-batch must be >= 1"),
        (["--adapters", "spam"], "is not NAME=PATH"),
        (["--adapters", f"spam={tmp_path / 'none'}"], "error: "),
        (["--adapters", f"a={adapters['spam']},a={adapters['lang']}"], "given twice"),
    ):
        argv = (
            ["serve", "--adapters", f"spam={adapters['spam']}", *args] if args[0] != "--adapters" else ["serve", *args]
        )
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("LORA_DIST_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    monkeypatch.delenv("LORA_DIST_TOKEN")
    assert read_token(None) is None


# ------------------------------------------------------------------------------------- shutdown


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(locked, truth):
    """The locked service's batch waits 10 minutes for more requests: ours are held in flight until the
    SIGTERM, which must run them, answer them, then exit 0. The token never reaches the log."""
    from concurrent.futures import ThreadPoolExecutor

    auth = {"Authorization": f"Bearer {TOKEN}"}
    texts = [[t] for t in TEXTS[:3]]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, locked, {"adapter": "spam", "texts": t}, headers=auth) for t in texts]
        end = time.monotonic() + 60
        while "lora_dist_queued_requests 3.0" not in httpx.get(locked.url + "/metrics").text:
            assert time.monotonic() < end and not any(f.done() for f in futures), "the requests never queued"
            time.sleep(0.05)
        locked.proc.send_signal(signal.SIGTERM)
        replies = [f.result(timeout=120) for f in futures]
    assert locked.proc.wait(60) == 0
    for t, r in zip(texts, replies, strict=True):
        assert r.status_code == 200, r.text
        same(r.json(), truth("spam", t))
    with pytest.raises(httpx.TransportError):
        httpx.get(locked.url + "/healthz", timeout=2)
    log = locked.log.read_text()
    assert "stopped" in log and TOKEN not in log and TOKEN not in (locked.proc.stdout.read() or "")


# ------------------------------------------------------------------------------------------ the page


@pytest.fixture
def chromium():
    """Headless Chromium (Selenium) that can reach this machine's loopback and nothing else: every other
    host name fails to resolve, so a page that needs a CDN shows it."""
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


def test_docs_render_offline(open_server, chromium):
    """/docs draws the operations from /openapi.json with Swagger UI's files from the service itself."""
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.get(open_server.url + "/docs")
    WebDriverWait(chromium, 60).until(lambda d: "/v1/classify" in d.find_element("id", "swagger-ui").text)
    loaded = chromium.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(open_server.url + "/") for u in loaded), loaded


RED, GREEN = "rgba(179, 38, 30, 1)", "rgba(30, 123, 52, 1)"  # the page's verdict colours (serve.html's --bad, --good)


def read_page(b) -> list[dict]:
    """Each result row as the page shows it: verdict, its probability and colour, and the bars' colours."""
    return [
        {
            "label": row.find_element("css selector", ".label").text,
            "p": float(row.find_element("css selector", ".label").get_attribute("data-p")),
            "colour": row.find_element("css selector", ".label").value_of_css_property("color"),
            "bars": [
                bar.value_of_css_property("background-color") for bar in row.find_elements("css selector", ".bar")
            ],
        }
        for row in b.find_elements("css selector", "tr.result")
    ]


def classify_on_page(b, url: str, adapter: str, messages: list[str]) -> list[dict]:
    from selenium.webdriver.support.ui import Select, WebDriverWait

    b.get(url + "/")
    wait = WebDriverWait(b, 60)
    wait.until(
        lambda d: any(o.get_attribute("value") == adapter for o in Select(d.find_element("id", "adapter")).options)
    )
    Select(b.find_element("id", "adapter")).select_by_value(adapter)
    b.find_element("id", "texts").send_keys("\n".join(messages))
    b.find_element("id", "go").click()
    wait.until(lambda d: len(d.find_elements("css selector", "tr.result")) == len(messages))
    return read_page(b)


def test_the_page_in_headless_chromium(open_server, chromium, tmp_path):
    """Type messages, pick an adapter, click: the verdicts shown are the API's, each label in a colour of its own,
    with the adapter's labels and base, the time taken and a link to /docs."""
    messages = ["URGENT! Call 09061701461 now to claim your cash", "see you at 6"]
    shown = classify_on_page(chromium, open_server.url, "support", messages)
    api = post(open_server, {"adapter": "support", "texts": messages}).json()["results"]
    assert [s["label"] for s in shown] == [r["label"] for r in api]
    assert [s["p"] for s in shown] == pytest.approx([r["probs"][r["label"]] for r in api], abs=1e-6)
    assert all(len(set(s["bars"])) == 3 for s in shown)  # billing, bug, praise: three colours, none red or green
    assert not {RED, GREEN} & {c for s in shown for c in s["bars"]}
    about = chromium.find_element("id", "about").text
    assert "billing, bug, praise" in about and "random weights (seed 123)" in about
    assert "2 messages classified in" in chromium.find_element("id", "status").text
    assert chromium.find_element("link text", "API docs").get_attribute("href") == open_server.url + "/docs"
    assert chromium.find_element("css selector", "link[rel=icon]").get_attribute("href").startswith("data:image/svg")
    chromium.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_the_page_shows_spam_in_red_and_ham_in_green(smoke_run, chromium, tmp_path):
    """The smoke run's adapter on real SMS messages it gets right: spam red, ham green, bars in the same colours.
    LORA_DIST_SCREENSHOT=docs/serve-page.png makes the README's picture from this page."""
    import os

    spam = [
        "FREE entry into our £250 weekly comp just send the word WIN to 80086 NOW. 18 T&C www.txttowin.co.uk",
        "You have an important customer service announcement. Call FREEPHONE 0800 542 0825 now!",
    ]
    ham = ["Sorry, I'll call later", "Remember to ask alex about his pizza"]
    messages = [spam[0], ham[0], spam[1], ham[1]]
    server = Server({"spam": smoke_run[0]}, log=tmp_path / "serve.log").wait_ready()
    chromium.set_window_size(960, 860)
    try:
        shown = classify_on_page(chromium, server.url, "spam", messages)
        if os.environ.get("LORA_DIST_SCREENSHOT"):  # how docs/serve-page.png is made
            chromium.save_screenshot(os.environ["LORA_DIST_SCREENSHOT"])
    finally:
        server.stop()
    assert [s["label"] for s in shown] == ["spam", "ham", "spam", "ham"]
    assert [s["colour"] for s in shown] == [RED, GREEN, RED, GREEN]
    assert all(s["bars"] == [GREEN, RED] for s in shown)  # ham's bar, then spam's, in the adapter's label order
    assert "Labels: ham, spam" in chromium.find_element("id", "about").text
