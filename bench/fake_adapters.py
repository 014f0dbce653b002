"""Random LoRA adapters on a random base, saved as training saves them (for benchmarks and tests).

    python bench/fake_adapters.py --model gpt2-small --n 16 --out /tmp/adapters    # /tmp/adapters/a00 ... a15

Each adapter is what `lora-dist train` writes (`adapter.save` with `AdapterSpec.for_run`), but with random,
non-zero A and B and a random head, so that adapters differ. `--ranks 4,8,16` cycles ranks, `--targets`
cycles target sets ("all", "*.att.*", "*.ff.*"), `--labels` cycles label sets.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

TARGETS = {"all": ("all",), "att": ("*.att.*",), "ff": ("*.ff.*",)}
LABELS = {"spam": ("ham", "spam"), "support": ("billing", "bug", "praise"), "lang": ("de", "en", "fr", "it")}


def make_adapter(
    out: Path,
    model: str = "tiny",
    base_seed: int = 123,
    seed: int = 0,
    rank: int = 8,
    targets: tuple[str, ...] = ("all",),
    labels: tuple[str, ...] = ("ham", "spam"),
    head: bool = True,
    train_head: bool = True,
    pad_to: int | None = None,
    max_length: int | None = None,
) -> Path:
    """Write a random adapter into `out`/adapter and return `out`."""
    from lora_dist import adapter as adapters
    from lora_dist.build import build_model
    from lora_dist.config import Config, DataConfig, LoRAConfig, ModelConfig, TrainConfig

    cfg = Config(
        model=ModelConfig(name=model, weights="random"),
        lora=LoRAConfig(
            rank=rank, alpha=2.0 * rank, scaling="alpha/r", targets=tuple(targets), head=head, train_head=train_head
        ),
        data=DataConfig(padding="batch"),
        train=TrainConfig(seed=base_seed),
    )
    with torch.device("meta"):  # only the names and shapes: the base is never built
        structure, wrapped = build_model(replace(cfg, model=replace(cfg.model, weights="random")), len(labels))
        from lora_dist.lora import adapter_state_dict

        shapes = {k: v.shape for k, v in adapter_state_dict(structure).items()}
        ctx = structure.cfg.context_length
    g = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.randn(s, generator=g) * (0.02 if k.endswith(".lora.B") else 0.1 if "head" in k else 0.05)
        for k, s in shapes.items()
    }
    spec = adapters.AdapterSpec.for_run(cfg, labels, max_length or ctx, wrapped, adapters.base_of(cfg))
    if pad_to:
        spec = replace(spec, pad_to=pad_to)
    adapters.save(Path(out), spec, tensors)
    return Path(out)


def make_set(
    out: Path,
    n: int,
    model: str = "tiny",
    ranks: tuple[int, ...] = (8,),
    targets: tuple[str, ...] | list[str] = ("all",),
    labels: tuple[str, ...] | list[str] = ("spam",),
    base_seed: int = 123,
) -> dict[str, Path]:
    """`n` adapters a00, a01, ... cycling ranks, target sets and label sets; returns {name: path}."""
    paths = {}
    for i in range(n):
        name = f"a{i:02d}"
        paths[name] = make_adapter(
            Path(out) / name,
            model,
            base_seed,
            seed=1000 + i,
            rank=ranks[i % len(ranks)],
            targets=TARGETS[targets[i % len(targets)]],
            labels=LABELS[labels[i % len(labels)]],
        )
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--ranks", default="8", help="comma-separated, cycled")
    p.add_argument("--targets", default="all", help="comma-separated of all, att, ff; cycled")
    p.add_argument("--labels", default="spam", help="comma-separated of spam, support, lang; cycled")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    paths = make_set(
        Path(a.out), a.n, a.model, tuple(int(r) for r in a.ranks.split(",")), a.targets.split(","), a.labels.split(",")
    )
    print(",".join(f"{k}={v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
