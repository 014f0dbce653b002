"""`lora-dist serve` over real HTTP on loopback: answers, every error, auth, batching, SIGTERM, the page; slow,
surplus and departed clients, failing requests, a full queue, a failed warm-up.

    pytest tests/test_serve.py -v

Services run as subprocesses for the whole module, all started at once: "open" (no auth, small limits) and
"locked" (a token, and a batch that waits 10 minutes for more requests: only a SIGTERM runs it, so the
requests it holds are in flight for sure when the signal comes) hold real adapters; "stand_in", "warmup_fails",
"slow_stop" and "stuck_stop" run a stand-in model (tests/serve_stand_in.py) whose batches a test can hold until
it releases them, fail, or watch, on a port the system picks (--port 0; the test reads it from the log). Every
wait is bounded and waits for an event (a log line, a metric, a file), not for time to pass.
"""

from __future__ import annotations

import asyncio
import json
import random
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
from conftest import ROOT, SAMPLE_TEXTS, cli_env

from lora_dist import UserError

sys.path.insert(0, str(ROOT / "bench"))
from fake_adapters import LABELS, make_adapter  # noqa: E402

TOKEN = "s3cret-token-for-tests"
TEXTS = [
    *SAMPLE_TEXTS,
    "I'll be home soon, want anything from the shop?",
    "the app crashes when I log in",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lora-dist serve --adapters ADAPTERS ARGS` in a subprocess, its stderr in `log`; `stand_in`: with the
    stand-in model (tests/serve_stand_in.py), writing into the directory `stand_in`, on a port the system picks."""

    def __init__(self, adapters: dict, *args: str, env: dict | None = None, log: Path, stand_in: Path | None = None):
        self.port = 0 if stand_in else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log, self.dir = log, stand_in
        spec = ",".join(f"{k}={v}" for k, v in adapters.items())
        entry = [str(ROOT / "tests" / "serve_stand_in.py")] if stand_in else ["-m", "lora_dist"]
        env = env or cli_env()
        if stand_in:
            env = {**env, "FAKE_MODEL_DIR": str(stand_in), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "serve", "--adapters", spec, "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )

    def logged(self, text: str, timeout: float = 120) -> str:
        """The log, once it holds `text`."""
        end = time.monotonic() + timeout
        while text not in (log := self.log.read_text()):
            assert self.proc.poll() is None or text in self.log.read_text(), f"the service exited: {log[-3000:]}"
            assert time.monotonic() < end, f"{text!r} not logged after {timeout} s: {log[-3000:]}"
            time.sleep(0.05)
        return log

    def bound(self, timeout: float = 180) -> Server:
        """Once listening: the port it logs it bound (with --port 0, the system's pick)."""
        line = next(x for x in self.logged("serving ", timeout).splitlines() if x.startswith("serving "))
        self.port = int(line.split(" on http://127.0.0.1:")[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def wait_ready(self, timeout: float = 180) -> Server:
        if self.port == 0:
            self.bound(timeout)
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

    def metric(self, name: str, **headers) -> float:
        """A series' value in GET /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + " "))

    def until(self, check, what: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"the service exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"{what} did not happen within {timeout} s: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)

    def batches(self) -> list[list[str]]:
        """What the stand-in model was given, batch by batch."""
        f = self.dir / "batches.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

    def release(self, name: str) -> None:
        (self.dir / name).touch()

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
    """Every service starts at once (each takes seconds to import and build)."""
    d = tmp_path_factory.mktemp("serve-logs")
    (d / "token").write_text(TOKEN + "\n")
    spam = {"spam": adapters["spam"]}
    stand = {name: tmp_path_factory.mktemp(f"stand-in-{name}") for name in ("stand_in", "warmup", "slow", "stuck")}
    started = {
        "stand_in": Server(
            spam,
            *("--token-file", str(d / "token"), "--open-metrics", "--access-log", "--max-queue", "3"),
            *("--max-wait-ms", "1", "--read-timeout-s", "2"),
            log=d / "stand_in.log",
            stand_in=stand["stand_in"],
        ),
        "warmup_fails": Server(
            spam,
            env=cli_env(FAKE_MODEL_WARMUP="fail"),
            log=d / "warmup.log",
            stand_in=stand["warmup"],
        ),
        "slow_stop": Server(
            spam,
            *("--read-timeout-s", "300", "--max-connections", "4", "--shutdown-timeout-s", "300"),
            log=d / "slow.log",
            stand_in=stand["slow"],
        ),
        "stuck_stop": Server(spam, "--shutdown-timeout-s", "2", log=d / "stuck.log", stand_in=stand["stuck"]),
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
def stand_in(servers):
    return servers["stand_in"].wait_ready()


@pytest.fixture(scope="module")
def truth(adapters):
    """What each adapter alone gives, through Classifier (the reference for every answer)."""
    from lora_dist import Classifier

    clfs = {n: Classifier.from_pretrained(p, device="cpu", precision="fp32") for n, p in adapters.items()}
    return lambda name, texts: clfs[name].predict(texts)


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/classify", json=body, timeout=60, **kw)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def send_request(sock: socket.socket, body: dict, headers: dict = AUTH) -> None:
    """A POST /v1/classify written on a raw (keep-alive) connection."""
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the next answer on a raw connection (its timeout bounds the wait)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed after {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection was closed mid-answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=60)


def labels(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [x["label"] for x in r.json()["results"]]


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
        # a batch holding one failing request: it alone gets the error, the others their answers
        calls.clear()
        jobs = [asyncio.ensure_future(b.submit("a", [t])) for t in ("ok1", "boom", "ok2")]
        gone = asyncio.ensure_future(b.submit("a", ["gone"]))
        while b.queued < 4:
            await asyncio.sleep(0)
        gone.cancel()  # its caller left before the batch ran
        b.flush()
        done = await asyncio.gather(*jobs, return_exceptions=True)
        assert done[0] == ["a:ok1"] and done[2] == ["a:ok2"] and isinstance(done[1], RuntimeError), done
        assert [[t for _, t in c] for c in calls] == [["ok1", "boom", "ok2"], ["ok1"], ["boom"], ["ok2"]]
        await b.stop()

    asyncio.run(scenario())


def test_loading_and_every_batch_run_on_the_one_model_thread(monkeypatch):
    """Each thread that runs torch gets its own OpenMP team, and two teams on 2 cores made every forward pass
    3-6x slower (lora_dist/serve/batcher.py). So the model is built, warmed up and run on one thread only."""
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


def test_auth_on_guards_metrics_and_readyz_names_no_adapter(locked):
    """With a token: /metrics needs it (it lists adapters and their traffic), /readyz answers without it but
    names no adapter, and an unauthenticated body is never read: bad JSON or too big, it gets 401."""
    r = httpx.get(locked.url + "/metrics")
    assert r.status_code == 401 and "spam" not in r.text and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(locked.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and "lora_dist_requests_total" in r.text
    r = httpx.get(locked.url + "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    for content in (b"{not json", b'{"adapter": "spam", "texts": ["' + b"x" * (2 << 20) + b'"]}'):
        r = httpx.post(locked.url + "/v1/classify", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 401 and "no Authorization header" in r.json()["error"], r.text


def test_open_metrics_answers_without_the_token(stand_in):
    """--open-metrics: Prometheus scrapes without the token; the API still needs it."""
    assert httpx.get(stand_in.url + "/metrics").status_code == 200
    assert httpx.get(stand_in.url + "/v1/adapters").status_code == 401
    assert httpx.get(stand_in.url + "/v1/adapters", headers=AUTH).status_code == 200


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
    monkeypatch.setenv("LORA_DIST_TOKEN", "s\u00e9cret")  # no header can carry it as the service would compare it
    with pytest.raises(UserError, match="LORA_DIST_TOKEN holds characters other than printable ASCII"):
        read_token(None)
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
        while "lora_dist_queued_requests 3.0" not in httpx.get(locked.url + "/metrics", headers=auth).text:
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


def test_sigterm_with_slow_clients_stops_at_once_and_surplus_connections_get_503(servers):
    """Clients that send nothing, half their headers, or one byte of a 1,000-byte body (read timeout 300 s) do not
    hold the stop back: SIGTERM closes them and the service exits 0 at once. Past --max-connections 4, a
    connection is answered 503 with Retry-After and closed."""
    slow = servers["slow_stop"].wait_ready()
    head = b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    clients = [connect(slow) for _ in range(3)]
    for sock, sent in zip(clients, (b"", head[:20], head + b"{"), strict=True):
        sock.sendall(sent)
    # the cap: counting a probe connection that may not be closed yet, connections 5 and 6 are past 4
    extra = [connect(slow) for _ in range(3)]
    for sock in extra[1:]:
        status, headers, body = read_response(sock)
        assert status == 503 and headers["retry-after"] == "1" and b"--max-connections" in body
        assert sock.recv(1) == b""
    t0 = time.monotonic()
    slow.proc.send_signal(signal.SIGTERM)
    assert slow.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30  # not the 300 s of --read-timeout-s or --shutdown-timeout-s
    for sock in clients:
        assert sock.recv(1000) == b""  # closed, unanswered: none of them had sent a whole request
        sock.close()
    for sock in extra:
        sock.close()
    log = slow.log.read_text()
    assert "stopped" in log and "Traceback" not in log, log


def test_sigterm_with_a_forward_pass_that_never_ends_exits_after_the_shutdown_timeout(servers):
    """A batch stuck in the model (the stand-in holds it for 60 s) delays the stop by --shutdown-timeout-s (2 s)
    only; the service says so and exits 0, without a traceback."""
    stuck = servers["stuck_stop"].wait_ready()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            httpx.post, stuck.url + "/v1/classify", json={"adapter": "spam", "texts": ["hold:never"]}, timeout=60
        )
        stuck.until(lambda: ["hold:never"] in stuck.batches(), "the stuck batch")
        t0 = time.monotonic()
        stuck.proc.send_signal(signal.SIGTERM)
        assert stuck.proc.wait(60) == 0
        elapsed = time.monotonic() - t0
        try:
            answer = held.result(60)
            assert answer.status_code == 503 and "stopped before answering" in answer.json()["error"]
        except httpx.TransportError:
            pass  # the process left before the answer was written: the client sees the connection close
    assert 2 <= elapsed < 30, elapsed  # the 2 s of --shutdown-timeout-s, not the 60 s the batch would take
    log = stuck.log.read_text()
    assert "with a forward pass still running" in log and "Traceback" not in log, log


# ------------------------------------------------------------------- the stand-in: failures and load


def test_port_0_listens_on_a_free_port_and_logs_it(stand_in):
    assert stand_in.port != 0
    assert f"on http://127.0.0.1:{stand_in.port}/" in stand_in.log.read_text()
    assert httpx.get(stand_in.url + "/healthz").json() == {"status": "ok"}


def test_a_failing_request_fails_alone_and_its_connection_stays_open(stand_in):
    """Three requests batched together, one of which the model fails on: the other two get their answers, the
    failing one a 500 naming the error, and its keep-alive connection answers the next request."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool, connect(stand_in) as sock:
        held = pool.submit(post, stand_in, {"adapter": "spam", "texts": ["hold:gate-batch"]}, headers=AUTH)
        stand_in.until(lambda: ["hold:gate-batch"] in stand_in.batches(), "the held batch")
        a = pool.submit(post, stand_in, {"adapter": "spam", "texts": ["a1"]}, headers=AUTH)
        c = pool.submit(post, stand_in, {"adapter": "spam", "texts": ["c1", "c2"]}, headers=AUTH)
        send_request(sock, {"adapter": "spam", "texts": ["boom"]})
        stand_in.until(lambda: stand_in.metric("lora_dist_queued_requests") == 4, "three requests queued")
        stand_in.release("gate-batch")
        status, _, body = read_response(sock)
        assert status == 500 and "index out of range in self" in json.loads(body)["error"], body
        send_request(sock, {"adapter": "spam", "texts": ["next"]})
        status, _, body = read_response(sock)  # the same connection
        assert status == 200 and [x["label"] for x in json.loads(body)["results"]] == ["next"]
        assert labels(held.result(60)) == ["hold:gate-batch"]
        assert labels(a.result(60)) == ["a1"] and labels(c.result(60)) == ["c1", "c2"]
    batched = [b for b in stand_in.batches() if "boom" in b]
    assert len(batched) == 2 and sorted(batched[0]) == ["a1", "boom", "c1", "c2"] and batched[1] == ["boom"]
    assert "a request for adapter 'spam' failed in the model: RuntimeError" in stand_in.log.read_text()


def test_a_full_queue_answers_503_with_retry_after(stand_in):
    """--max-queue 3: while the model is busy, a fourth waiting request is refused at once; the three get
    their answers once it is free."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(post, stand_in, {"adapter": "spam", "texts": ["hold:gate-queue"]}, headers=AUTH)
        stand_in.until(lambda: ["hold:gate-queue"] in stand_in.batches(), "the held batch")
        queued = [pool.submit(post, stand_in, {"adapter": "spam", "texts": [f"q{i}"]}, headers=AUTH) for i in range(3)]
        stand_in.until(lambda: stand_in.metric("lora_dist_queued_requests") == 4, "three requests queued")
        r = post(stand_in, {"adapter": "spam", "texts": ["one too many"]}, headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-queue" in r.json()["error"]
        stand_in.release("gate-queue")
        assert labels(held.result(60)) == ["hold:gate-queue"]
        assert [labels(f.result(60)) for f in queued] == [["q0"], ["q1"], ["q2"]]
    assert not any("one too many" in b for b in stand_in.batches())


def test_requests_whose_clients_left_are_never_computed(stand_in):
    """Three clients send a request while the model is busy, then leave: their requests are dropped (counted),
    never run, and the next request is answered at once."""
    abandoned = stand_in.metric("lora_dist_abandoned_requests_total")
    skipped = stand_in.metric("lora_dist_skipped_requests_total")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, stand_in, {"adapter": "spam", "texts": ["hold:gate-gone"]}, headers=AUTH)
        stand_in.until(lambda: ["hold:gate-gone"] in stand_in.batches(), "the held batch")
        clients = [connect(stand_in) for _ in range(3)]
        for i, sock in enumerate(clients):
            send_request(sock, {"adapter": "spam", "texts": [f"gone-{i}"] * 8})
        stand_in.until(lambda: stand_in.metric("lora_dist_queued_requests") == 4, "three requests queued")
        for sock in clients:
            sock.close()
        stand_in.until(lambda: stand_in.metric("lora_dist_abandoned_requests_total") == abandoned + 3, "noticed")
        stand_in.release("gate-gone")
        assert labels(held.result(60)) == ["hold:gate-gone"]
    assert labels(post(stand_in, {"adapter": "spam", "texts": ["after"]}, headers=AUTH)) == ["after"]
    assert stand_in.metric("lora_dist_skipped_requests_total") == skipped + 3
    assert not any(t.startswith("gone-") for b in stand_in.batches() for t in b)


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\n",
        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    ],
    ids=["nothing", "half-the-headers", "one-byte-of-the-body"],
)
def test_a_client_too_slow_to_send_its_request_is_cut_off(stand_in, sent):
    """--read-timeout-s 2: a request not read in 2 s is answered 408 and its connection closed (uvicorn alone
    waits for ever, and such connections used up the file descriptors)."""
    before = stand_in.metric('lora_dist_dropped_connections_total{reason="read_timeout"}')
    t0 = time.monotonic()
    with connect(stand_in) as sock:
        sock.sendall(sent)
        status, headers, body = read_response(sock)
        assert status == 408 and b"--read-timeout-s" in body and headers["connection"] == "close"
        assert sock.recv(1) == b""
    assert time.monotonic() - t0 >= 1.9  # not before the deadline
    if b"Content-Length" in sent:  # the request reached the API: the access log names its 408
        stand_in.logged('"POST /v1/classify" 408 ')
    assert stand_in.metric('lora_dist_dropped_connections_total{reason="read_timeout"}') == before + 1


def test_access_log_has_a_line_per_request(stand_in):
    httpx.get(stand_in.url + "/healthz?probe=access-log")
    stand_in.logged('"GET /healthz?probe=access-log" 200 ')
    line = next(x for x in stand_in.log.read_text().splitlines() if "probe=access-log" in x)
    assert line.startswith("access: 127.0.0.1:") and line.endswith(" ms"), line


def test_readyz_says_not_ready_after_a_failed_warm_up(servers):
    """The warm-up fails after the model was built: /readyz stays 503 naming why, classify answers 503."""
    s = servers["warmup_fails"].bound()
    s.logged("error: the model did not load (RuntimeError: CUDA out of memory (stand-in))")
    r = httpx.get(s.url + "/readyz")
    assert r.status_code == 503 and "CUDA out of memory" in r.json()["error"], r.text
    assert httpx.get(s.url + "/healthz").status_code == 200
    r = post(s, {"adapter": "spam", "texts": ["hi"]})
    assert r.status_code == 503 and "the model failed to load" in r.json()["error"]


# ------------------------------------------------------------------------------------------ the page


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


@pytest.mark.slow  # 10-18 s: make test runs it, make test-fast not
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


def test_a_batch_waits_for_requests_whose_adapter_is_being_read():
    """A request that waits for its adapter's read (`pending`) is not yet queued when the next batch forms; the
    batch waits for it (up to pending_wait_ms), so a miss costs its read, not a whole batch more. With nothing
    pending, a batch leaves after max_wait_ms as before."""
    from lora_dist.serve.batcher import Batcher

    calls: list[list[str]] = []
    reading = [0]

    def run(texts, adapters):
        calls.append(list(texts))
        return list(texts)

    async def scenario():
        b = Batcher(run, max_batch=8, max_wait_ms=0, pending=lambda: reading[0], pending_wait_ms=600_000)
        b.start()
        reading[0] = 1  # one request is on its way
        first = asyncio.ensure_future(b.submit("a", ["hit"]))
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert not calls  # the batch waits for the request being read
        second = asyncio.ensure_future(b.submit("b", ["miss"]))  # its read done, it is queued ...
        await asyncio.sleep(0)
        reading[0] = 0  # ... and nothing more is on its way
        assert await first == ["hit"] and await second == ["miss"]
        assert calls == [["hit", "miss"]]
        alone = await b.submit("a", ["next"])  # nothing pending: max_wait_ms (0) and off it goes
        assert alone == ["next"] and calls[-1] == ["next"]
        await b.stop()

    asyncio.run(scenario())
