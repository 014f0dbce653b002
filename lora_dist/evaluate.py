"""Re-evaluate a run's saved adapter on one of its splits, or on a labelled file of your own.

    lora-dist eval runs/smoke                          # the test split the run was trained against
    lora-dist eval runs/smoke --split validation
    lora-dist eval runs/smoke --data my_messages.csv   # CSV/TSV with a header holding text and label

The model is rebuilt from `RUN_DIR/config.yaml` (the same base weights; random ones are re-drawn from the
same seed), then `RUN_DIR/adapter/` is loaded into it. Messages are truncated and padded as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .scores import scores

SPLITS = ("train", "validation", "test")


def load_run_config(run_dir: Path):
    """The resolved config of a run with a saved adapter, or a UserError that says what RUN_DIR should be."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the output_dir of a lora-dist training run")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a lora-dist run (no config.yaml); pass the output_dir of a training run")
    adapter = run_dir / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if not (adapter / name).is_file():
            raise UserError(f"{run_dir} has no saved adapter ({adapter / name} is missing); finish the training "
                            f"(train.resume=auto) or pass a run that finished")
    return load_config(run_dir / "config.yaml")


def load_model(run_dir: Path, cfg):
    """The run's model with its adapter loaded, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .lora import load_adapter_state_dict
    from .train import build_model, seed_everything

    seed_everything(cfg.train.seed)  # as in training: random base weights come out the same
    model, _ = build_model(cfg)
    path = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} cannot be read ({e}); it is damaged, retrain or restore it")
    load_adapter_state_dict(model, state, source=str(path))
    return model.eval()


def evaluate_run(run_dir: Path, split: str = "test", data: str | None = None, device: str = "auto",
                 batch_size: int | None = None) -> dict:
    """{"source", "count", "loss", "accuracy", "precision", "recall", "f1", "confusion", "classes"}."""
    from .data import CLASS_NAMES, Collate, SpamDataset, build_datasets, read_table
    from .strategy import pick_device
    from .tokenizer import get_tokenizer

    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    cfg = load_run_config(run_dir)
    split_files = {name: run_dir / "splits" / f"{name}.csv" for name in SPLITS}
    missing = [str(p) for p in split_files.values() if not p.is_file()]
    if missing:
        raise UserError(f"{run_dir} lacks its saved splits ({missing[0]}); it was not written by lora-dist train")
    model = load_model(run_dir, cfg)
    tokenizer = get_tokenizer()
    datasets, length = build_datasets({k: read_table(p) for k, p in split_files.items()}, tokenizer, cfg.data,
                                      model.cfg.context_length)
    dataset = SpamDataset(read_table(data), tokenizer, length) if data else datasets[split]
    collate = Collate(cfg.data.pad_token_id, length if cfg.data.padding == "longest" else None)
    dev = pick_device(device, 0)
    confusion, loss = _run(model.to(dev), dataset, collate, batch_size or cfg.train.batch_size, dev,
                           _amp_dtype(cfg.train.precision, dev), cfg.model.num_classes)
    return {"source": str(data) if data else split, "loss": loss, **scores(confusion),
            "confusion": confusion, "classes": list(CLASS_NAMES)}


@torch.no_grad()
def _run(model, dataset, collate, batch_size: int, device, amp_dtype, k: int) -> tuple[list[list[int]], float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    confusion = torch.zeros(k * k, dtype=torch.long)  # true x predicted, flattened
    loss_sum, count = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch.ids, batch.last).float()  # (B, num_classes)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        count += len(batch)
        confusion += torch.bincount((batch.labels * k + logits.argmax(-1)).cpu(), minlength=k * k)
    return confusion.view(k, k).tolist(), loss_sum / max(1, count)


def _amp_dtype(precision: str, device):
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def format_result(r: dict) -> str:
    """A few plain lines for the terminal."""
    classes = r["classes"]
    head = "true \\ predicted"
    rows = [f"  {head:>18} " + " ".join(f"{c:>8}" for c in classes)]
    rows += [f"  {name:>18} " + " ".join(f"{n:>8,}" for n in row) for name, row in zip(classes, r["confusion"])]
    return "\n".join([
        f"{r['source']}: {r['count']:,} messages, loss {r['loss']:.4f}",
        f"accuracy {r['accuracy'] * 100:.2f}%, spam precision {r['precision'] * 100:.2f}%, "
        f"recall {r['recall'] * 100:.2f}%, F1 {r['f1'] * 100:.2f}%",
        "confusion matrix:", *rows,
    ])


def main(run_dir: str, split: str = "test", data: str | None = None, device: str = "auto", as_json: bool = False) -> int:
    result = evaluate_run(Path(run_dir), split, data, device)
    print(json.dumps(result, indent=2) if as_json else format_result(result))
    return 0
