"""A PEFT adapter in a service's adapters directory is described from its header alone, then served.

    pytest tests/test_peft_scan.py -v

`peft.describe` gives the description `peft.read` gives, from adapter_config.json, lora-dist's sidecar and the
safetensors header (checked against `read` for lora-dist's exports, one with its sidecar gone and one made by
PEFT itself); the catalog lists a PEFT export whose tensor data is cut off after the header, and a request for
it gets the catalog's 503; an intact one answers as the lora-dist adapter it was exported from.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import pytest
import torch
from test_export import CASES, export, made_elsewhere, make_adapter

from lora_dist import MultiAdapterClassifier, UserError, peft
from lora_dist.adapter import find, save
from lora_dist.infer.adapter_store import Catalog, Unavailable

TEXTS = ["WINNER!! claim your prize now", "see you at 6", "ok"]


def header_only(file) -> None:
    """Cut a safetensors file after its header: what is left names every tensor and holds none."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    file.write_bytes(data[: 8 + n])


def shareable(run, out):
    """`run`'s adapter with the head's bias zero, saved in `out`: its PEFT export then replaces no base tensor
    (a bias moves into ln_f, which a shared base cannot take), so it can share a service with others."""
    a = find(run)
    tensors = {k: (torch.zeros_like(t) if "head" in k and k.endswith("bias") else t) for k, t in a.tensors().items()}
    save(out, a.spec, tensors)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_the_header_gives_the_description_the_tensors_give(case, tiny_checkpoint, tmp_path):
    run = make_adapter(tmp_path / "run", tiny_checkpoint, *CASES[case])
    assert export(run, "peft", tmp_path / "peft") == 0
    spec, _ = peft.read(tmp_path / "peft", None)
    assert peft.describe(tmp_path / "peft", None) == spec and peft.agrees(spec, spec)

    # without lora-dist's sidecar the header cannot tell which of c_attn's block-diagonal columns are the
    # query's: every layer of a block, at the block's rank; the tensors then give fewer layers or columns
    (tmp_path / "peft" / peft.SIDECAR).unlink()
    spec, _ = peft.read(tmp_path / "peft", None)
    described = peft.describe(tmp_path / "peft", None)
    assert peft.agrees(spec, described)
    assert set(spec.lora["targets"]) <= set(described.lora["targets"])
    assert spec.lora["rank"] <= described.lora["rank"]
    if case == "qv-rslora":  # the key's rows of c_attn are zero: no key layer, and each block's columns split
        assert "blocks.0.att.key" in described.lora["targets"] and "blocks.0.att.key" not in spec.lora["targets"]
        assert described.lora["rank"] == 8 and spec.lora["rank"] == 4
    # what `agrees` refuses: a description that lists fewer layers, a lower rank, other labels
    assert not peft.agrees(spec, replace(described, lora=described.lora | {"targets": spec.lora["targets"][1:]}))
    assert not peft.agrees(spec, replace(described, lora=described.lora | {"rank": spec.lora["rank"] - 1}))
    assert not peft.agrees(spec, replace(described, labels=("a", "b")))


def test_a_peft_adapter_trained_elsewhere_is_described_as_read(tiny_checkpoint, tmp_path):
    """Dense c_attn block, rank and alpha patterns, ln_f saved: the header alone gives `read`'s description."""
    made_elsewhere(tiny_checkpoint, tmp_path / "elsewhere")
    spec, _ = peft.read(tmp_path / "elsewhere", None)
    assert peft.describe(tmp_path / "elsewhere", None) == spec
    assert set(spec.overrides) == {"final_norm.weight", "final_norm.bias"} and len(spec.labels) == 3


def test_what_the_header_says_is_checked(tiny_checkpoint, tmp_path):
    run = make_adapter(tmp_path / "run", tiny_checkpoint)
    assert export(run, "peft", tmp_path / "peft") == 0
    f = tmp_path / "peft" / "adapter_model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    for damage, message in (
        (b"\x01\x02", "cannot be read"),  # shorter than the header's length
        ((2**40).to_bytes(8, "little") + data[8:], "a header of 1099511627776 bytes"),
        ((3).to_bytes(8, "little") + b"[1]", "header is not a JSON object"),
    ):
        f.write_bytes(damage)
        with pytest.raises(UserError, match=message):
            peft.describe(tmp_path / "peft", None)
    name = next(k for k in header if k.endswith("score.weight"))
    for change, message in (
        ({"dtype": "I64"}, "is I64; adapters hold floating-point tensors"),
        ({"shape": [2]}, r"score.weight is \[2\], not \(classes, 128\)"),
        ({"shape": "2x128"}, "has no dtype and shape"),
    ):
        raw = json.dumps(header | {name: header[name] | change}).encode()
        f.write_bytes(len(raw).to_bytes(8, "little") + raw)
        with pytest.raises(UserError, match=message):
            peft.describe(tmp_path / "peft", None)


@pytest.fixture
def adapters_dir(tiny_checkpoint, tmp_path):
    """DIR/lora/run (a lora-dist adapter), DIR/peft/exp (its PEFT export) and DIR/peft/cut (the same export, its
    tensor file cut after the header): one base, so one service serves them all."""
    root = tmp_path / "adapters"
    run = shareable(make_adapter(tmp_path / "made", tiny_checkpoint), root / "lora" / "run")
    (root / "peft").mkdir()
    assert export(run, "peft", root / "peft" / "exp") == 0
    shutil.copytree(root / "peft" / "exp", root / "peft" / "cut")
    header_only(root / "peft" / "cut" / "adapter_model.safetensors")
    return root


def test_a_peft_export_is_listed_from_its_header_and_answers_as_its_adapter(adapters_dir):
    lines: list[str] = []
    catalog = Catalog(adapters_dir, log=lines.append)
    diff = catalog.scan()
    assert sorted(catalog.entries) == ["lora/run", "peft/cut", "peft/exp"] and not diff["broken"], lines
    assert catalog.entries["peft/cut"].spec == peft.read(adapters_dir / "peft" / "exp", None)[0]
    m = MultiAdapterClassifier.from_pretrained(None, adapters_dir, device="cpu", max_loaded=2)
    want = m.predict(TEXTS, "lora/run")
    got = m.predict(TEXTS, "peft/exp")
    for w, g in zip(want, got, strict=True):
        assert g["label"] == w["label"] and g["probs"] == pytest.approx(w["probs"], abs=1e-5, rel=0)
    with pytest.raises(Unavailable, match="cannot be read.*damaged"):
        m.predict(TEXTS, "peft/cut")


def test_the_service_lists_the_cut_export_and_answers_503_for_it(adapters_dir):
    from fastapi.testclient import TestClient

    from lora_dist.serve.app import Service, create_app

    lines: list[str] = []
    catalog = Catalog(adapters_dir, log=lines.append)
    catalog.scan()
    service = Service([], device="cpu", log=lines.append, catalog=catalog, max_loaded=2)
    with TestClient(create_app(service)) as client:
        end = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end and not service.failed, lines
            time.sleep(0.05)
        listed = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
        assert sorted(listed) == ["lora/run", "peft/cut", "peft/exp"]
        ok = client.post("/v1/classify", json={"adapter": "peft/exp", "texts": TEXTS})
        assert ok.status_code == 200, ok.text
        cut = client.post("/v1/classify", json={"adapter": "peft/cut", "texts": TEXTS})
        assert cut.status_code == 503 and "damaged" in cut.json()["error"], cut.text
        assert any("peft/cut" in x and "cannot be read" in x for x in lines), lines


def test_the_base_shape_is_read_again_when_its_config_changes(tiny_checkpoint, tmp_path):
    """The base's shape is kept per version of its config.json (a catalog describes thousands of adapters on one
    base): another config.json, another shape, so an adapter of the old size is refused."""
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    run = make_adapter(tmp_path / "run", base)
    assert export(run, "peft", tmp_path / "peft") == 0
    assert peft.describe(tmp_path / "peft", None).lora["targets"]
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"n_embd": 64}))
    with pytest.raises(UserError, match="this base's layer is 64 -> 192; the adapter is for another GPT-2 size"):
        peft.describe(tmp_path / "peft", None)
