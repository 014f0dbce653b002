"""`lora-dist adapter info PATH`: what is at PATH, whoever wrote it.

    lora-dist adapter info runs/smoke                 # a run (or its adapter/): adapter.info
    lora-dist adapter info exports/smoke-peft         # a PEFT adapter: lora-dist's export or one trained with PEFT
    lora-dist adapter info runs/sweep                 # a sweep: its adapters, best first

A PEFT adapter is described from its files alone (adapter_config.json, the tensor file's header, lora-dist's
description beside an export): base, rank, alpha, targets, labels and where it came from; then what lora-dist
reads it as, or why it cannot yet (a base it names nowhere: pass --base DIR to classify and serve).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from . import adapter, peft
from .errors import UserError
from .files import read_json


def info(path: str | Path, base: str | None = None) -> str:
    p = Path(path)
    if p.is_dir() and adapter.sweep_adapters(p) is not None:
        return sweep_info(p)
    if peft.is_peft_dir(p) and (p / "adapter_model.safetensors").is_file():
        return peft_info(p, base)  # (without it: adapter.info's one line, e.g. on a pickle-only adapter)
    return adapter.info(p)


def sweep_info(p: Path) -> str:
    """A sweep's directory: its adapters, in sweep.json's order (best first) where it has one."""
    names = adapter.sweep_adapters(p) or []
    entries: list[dict] = []
    try:
        got = json.loads((p / "sweep.json").read_text()).get("adapters") if (p / "sweep.json").is_file() else None
        entries = [e for e in got if isinstance(e, dict) and isinstance(e.get("name"), str)] if got else []
    except (OSError, ValueError, AttributeError, TypeError):
        entries = []
    listed = {e["name"] for e in entries}
    entries += [{"name": n, "status": "done"} for n in names if n not in listed]
    trained = sum(e["name"] in names for e in entries)
    lines = [
        f"{p}  (a lora-dist sweep: {len(entries)} adapters, {trained} with a saved adapter)",
        "",
        f"{'adapter':<28} {'status':<9} {'val acc':>8} {'test acc':>8}  path",
    ]
    for e in entries[:1000]:
        pct = lambda v: f"{v * 100:.2f}%" if isinstance(v, (int, float)) else "-"  # noqa: E731
        where = p / "adapters" / e["name"]
        lines.append(
            f"{e['name']:<28} {str(e.get('status', '?')):<9} {pct(e.get('val_accuracy')):>8} "
            f"{pct(e.get('test_accuracy')):>8}  {where if e['name'] in names else '(no adapter saved)'}"
        )
    lines += [
        "",
        f"One adapter: lora-dist adapter info {p / 'adapters' / (names[0] if names else 'NAME')}; "
        f"the summary: lora-dist report {p}",
    ]
    return "\n".join(lines)


def peft_info(p: Path, base: str | None = None) -> str:
    """A PEFT LoRA adapter, from its files; then what lora-dist reads it as."""
    config = read_json(p / "adapter_config.json", "restore the file")
    sidecar = p / peft.SIDECAR
    made = None
    if sidecar.is_file():
        try:
            made = adapter.AdapterSpec.from_json(read_json(sidecar, ""), str(sidecar))
        except UserError:
            made = None
    ref = config.get("base_model_name_or_path")
    tensors, shapes, size = _header(p / "adapter_model.safetensors")
    score = shapes.get(peft.PREFIX + "score.weight")
    origin = (
        f"exported by lora-dist ({peft.SIDECAR} beside it describes the adapter it was made from)"
        if made
        else "trained with PEFT"
        + (f" {config['peft_version']}" if config.get("peft_version") else "")
        + f" (task {config.get('task_type') or 'not named'})"
    )
    if made:
        labels = ", ".join(made.labels)
    elif score:
        labels = f"{score[0]} classes, no names saved (LABEL_0 ... LABEL_{score[0] - 1}; name them with --labels)"
    else:
        labels = "no score layer saved (modules_to_save); lora-dist cannot use it"
    targets = config.get("target_modules")
    if isinstance(targets, list):  # full module paths (as lora-dist's export writes them) shown by kind
        kinds = list(dict.fromkeys(".".join(str(t).split(".")[-2:]) for t in targets))
        targets = ", ".join(kinds) + (f" ({len(targets)} modules)" if len(kinds) < len(targets) else "")
    else:
        targets = str(targets)
    patterns = {k: config.get(k) for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    lines = [
        f"{p}  (PEFT {config.get('peft_type')} adapter)",
        f"from:      {origin}",
        "base:      "
        + (made.base.describe() if made else (str(ref) if ref else "not named (base_model_name_or_path is null)"))
        + (f"; --base {base}" if base else ""),
        f"trained:   LoRA rank {config.get('r')}, alpha {config.get('lora_alpha')}"
        + (", rsLoRA" if config.get("use_rslora") else "")
        + f" on {targets}"
        + (f" ({', '.join(f'{k} {v}' for k, v in patterns.items())})"[:300] if patterns else "")
        + (
            f"; saved in full: {', '.join(config.get('modules_to_save') or [])}"
            if config.get("modules_to_save")
            else ""
        ),
        f"labels:    {labels}",
    ]
    if tensors is not None:
        lines.append(f"tensors:   {tensors} in adapter_model.safetensors, {size:,} bytes ({size / 2**20:.2f} MiB)")
    try:
        spec, _ = peft.read(p, base)
        lines.append(
            f"reads as:  {spec.lora['rank'] if spec.lora else '?'}-rank LoRA on {len(spec.lora['targets']) if spec.lora else 0} "
            f"lora-dist layers, labels {', '.join(spec.labels)}, messages truncated to {spec.max_length} tokens"
        )
        lines += ["", json.dumps(spec.to_json(), indent=2)]
    except UserError as e:
        lines.append(f"reads as:  not yet: {e}")
    return "\n".join(lines)


def _header(file: Path) -> tuple[int | None, dict[str, list[int]], int]:
    """(tensor count, {name: shape}, bytes) from a safetensors file's header alone; (None, {}, 0) if unreadable."""
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return len(shapes), shapes, file.stat().st_size
    except (SafetensorError, OSError, ValueError):
        return None, {}, 0
