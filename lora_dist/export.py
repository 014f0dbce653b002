"""Export an adapter to the Hugging Face ecosystem: a PEFT LoRA adapter, or a whole merged model.

    lora-dist export runs/smoke --format peft --out exports/smoke-peft      # a PEFT LoRA adapter
    lora-dist export runs/smoke --format merged --out exports/smoke-merged  # a whole Hugging Face model

Both are for transformers' `GPT2ForSequenceClassification`. Its GPT-2 keeps `Conv1D` weights (in, out)
and fuses query, key and value into one `c_attn`, so our three adapters become one LoRA block on `c_attn`
of rank r_q + r_k + r_v: lora_A stacks their A's, lora_B is block-diagonal (the query's output rows read
only the query's B; a projection without an adapter gives zero rows). Where ranks differ from PEFT's `r`,
`rank_pattern`/`alpha_pattern` say so, with the alpha that gives each block our scale exactly.

The head becomes `score` (PEFT's `modules_to_save`), its LoRA merged in. `score` has no bias and ours has
one, b: it is absorbed into the bias of the final LayerNorm, which nothing but the head reads:
W (ln_f(x) + d) = W ln_f(x) + b for d = pinv(W) b, exact when W (classes x width) has full row rank. So
`ln_f` is saved too. transformers reads the last token that is not padding, our `last_real` pooling.
PEFT adapters are read back by `peft.read` (through `build.read_adapter`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from importlib import resources
from pathlib import Path

import torch

from .adapter import AdapterSpec
from .build import load_trained, read_adapter
from .errors import UserError
from .files import WRITE_ERRORS, write_error
from .lora import LinearWithLoRA, adapted_layers, adapter_names, base_key, merge
from .model import GPT2, GPTConfig
from .peft import PREFIX, SIDECAR, hf_modules
from .weights import hf_config, hf_state_dict, key_map, save_file


def main(path: str, fmt: str, out: str, base: str | None = None) -> int:
    """`lora-dist export PATH --format peft|merged --out DIR`."""
    spec, tensors, source = read_adapter(path, base)
    check_exportable(spec, fmt, source)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {target} exists and is not an empty directory; choose a new one")
    model = load_trained(spec, tensors, source, base).cpu()  # a random base drawn on a GPU is drawn there
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "peft":
            notes = write_peft(model, spec, set(tensors), source, tmp, target, base)
        else:
            notes = write_merged(model, spec, tmp)
        write_tokenizer(tmp, spec)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except WRITE_ERRORS as e:  # a full disk (or another failed write): one line, and the temporary copy is gone
        needed = sum(t.nbytes for t in (model.state_dict() if fmt == "merged" else tensors).values())
        raise write_error(
            target.parent.resolve(), needed, e, target.name, "free some space, or export to another disk"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"written: {target} ({fmt}: {', '.join(sorted(p.name for p in target.iterdir()))})")
    for note in notes:
        print(f"note: {note}")
    return 0


def check_exportable(spec: AdapterSpec, fmt: str, source: str) -> None:
    """What transformers' GPT2ForSequenceClassification cannot do is refused, never approximated."""
    if spec.pooling != "last_real":
        raise UserError(
            f"{source} pools '{spec.pooling}', but GPT2ForSequenceClassification reads the last token that "
            f"is not padding (pooling last_real); use it with lora-dist classify, or retrain with model.pooling=last_real"
        )
    if not spec.causal_mask:
        raise UserError(
            f"{source} was trained without the causal mask (model.causal_mask: false), which GPT-2 in "
            f"transformers always applies; use it with lora-dist classify, or retrain with the mask"
        )
    if fmt == "peft" and spec.kind != "lora":
        raise UserError(
            f"{source} trains whole layers (train.trainable={spec.trainable}), not LoRA adapters, so it "
            f"has no PEFT LoRA form; export it with --format merged"
        )


# ------------------------------------------------------------------------------------------- writing


def _plain_state(model: GPT2) -> dict[str, torch.Tensor]:
    """The model's own weights under the plain GPT2 names (LoRA wrappers' `.linear.` dropped, adapters left out)."""
    skip = adapter_names(model)
    return {k.replace(".linear.", "."): v for k, v in model.state_dict().items() if k not in skip}


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(
        {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, str(file), metadata={"format": "pt"}
    )


@torch.no_grad()
def head_without_bias(model: GPT2, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(score weight (classes, C), final LayerNorm bias (C,)): the head, its LoRA merged, with its bias
    moved into the LayerNorm's bias, so that the bias-free `score` gives the same logits."""
    head = model.head
    if isinstance(head, LinearWithLoRA):
        head.merge()
        head = head.linear
    W, b, beta = head.weight.float(), head.bias, model.final_norm.bias.float()
    if b is None or not b.any():
        return W.clone(), beta.clone()
    d = torch.linalg.pinv(W.double()) @ b.double()  # (C,): W d = b
    new = (beta.double() + d).float()
    err = (W.double() @ (new.double() - beta.double()) - b.double()).abs().max().item()
    if err > 1e-6 * (1.0 + b.abs().max().item()):
        raise UserError(
            f"{source}: the head's bias cannot be moved into GPT-2's final LayerNorm (the head's rows are "
            f"linearly dependent, error {err:.2g}), and transformers' score layer has no bias; "
            f"use the adapter with lora-dist classify"
        )
    return W.clone(), new


def write_merged(model: GPT2, spec: AdapterSpec, out: Path) -> list[str]:
    """config.json (GPT2ForSequenceClassification) and model.safetensors, LoRA folded into the weights."""
    merge(model)
    score, ln_f_bias = head_without_bias(model, "the adapter")
    body = hf_state_dict(model.cfg, _plain_state(model))
    body["ln_f.bias"] = ln_f_bias
    write_classifier(model.cfg, spec, body, score, out)
    return []


def write_classifier(
    cfg: GPTConfig, spec: AdapterSpec, body: dict[str, torch.Tensor], score: torch.Tensor, out: Path
) -> None:
    """A GPT2ForSequenceClassification checkpoint: model.safetensors (`transformer.*`, `score.weight`), config.json."""
    _save({f"transformer.{k}": v for k, v in body.items()} | {"score.weight": score}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(classifier_config(cfg, spec), indent=2) + "\n")


def classifier_config(cfg: GPTConfig, spec: AdapterSpec) -> dict:
    return hf_config(cfg) | {
        "architectures": ["GPT2ForSequenceClassification"],
        "id2label": dict(enumerate(spec.labels)),
        "label2id": {label: i for i, label in enumerate(spec.labels)},
        "pad_token_id": spec.pad_token_id,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "problem_type": "single_label_classification",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    }


def write_peft(
    model: GPT2, spec: AdapterSpec, names: set[str], source: str, out: Path, final: Path, base: str | None
) -> list[str]:
    """adapter_config.json + adapter_model.safetensors (PEFT's names), and lora-dist's description beside them."""
    table, C = hf_modules(model.cfg.n_layers), model.cfg.emb_dim
    notes: list[str] = []
    groups: dict[str, dict] = {}  # HF module -> {slot: (A (in, r), B (r, out), scale)}
    used = adapter_names(model)
    for name, m in adapted_layers(model):
        if name != "head":
            if name not in table:
                raise UserError(
                    f"{source}: layer '{name}' has a LoRA adapter that PEFT cannot place on "
                    f"GPT2ForSequenceClassification; export --format merged"
                )
            hf, slot = table[name]
            groups.setdefault(hf, {})[slot] = m.lora.factors()
    used |= {"head.weight", "head.bias", base_key("head"), base_key("head", "bias"), *spec.overrides}
    if names - used:
        raise UserError(
            f"{source} holds {sorted(names - used)[:3]}, which this export cannot represent in PEFT's "
            f"format; export --format merged"
        )
    tensors, ranks, scales = {}, {}, {}
    for hf, parts in groups.items():
        if None in parts:
            a, b, s = parts[None]
            A, B = a.t(), b.t()  # (r, in), (out, r)
        else:  # the fused c_attn: one block of the summed rank, block-diagonal B
            s = parts[min(parts)][2]
            A = torch.cat([parts[k][0].t() for k in sorted(parts)])  # (R, C)
            B = torch.zeros(3 * C, A.shape[0])  # (3C, R)
            col = 0
            for k in sorted(parts):
                a, b, sk = parts[k]
                r = a.shape[1]
                B[k * C : (k + 1) * C, col : col + r] = b.t() * (sk / s)
                col += r
        tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"] = A, B
        ranks[hf], scales[hf] = A.shape[0], s
    lora = spec.lora or {}
    rslora = lora.get("scaling") == "rslora"
    alphas = {hf: scales[hf] * (math.sqrt(ranks[hf]) if rslora else ranks[hf]) for hf in groups}  # PEFT: alpha / r
    r0, a0 = Counter((ranks[hf], alphas[hf]) for hf in groups).most_common(1)[0][0]
    score, ln_f_bias = head_without_bias(model, source)
    tensors[f"{PREFIX}score.weight"] = score
    saved = ["score"]
    if ln_f_bias is not None and (
        not torch.equal(ln_f_bias, model.final_norm.bias) or any(k.startswith("final_norm.") for k in spec.overrides)
    ):
        tensors[f"{PREFIX}transformer.ln_f.weight"] = model.final_norm.weight
        tensors[f"{PREFIX}transformer.ln_f.bias"] = ln_f_bias
        saved.append("ln_f")
    saved += _saved_overrides(model, spec, groups, tensors, source)
    _save(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": _base_ref(model, spec, out, final, base, notes),
        "revision": None,
        "r": r0,
        "lora_alpha": a0,
        "use_rslora": rslora,
        "lora_dropout": lora.get("dropout", 0.0),
        "target_modules": list(groups),
        "fan_in_fan_out": True,
        "bias": "none",
        "modules_to_save": saved,
        "rank_pattern": {hf: ranks[hf] for hf in groups if ranks[hf] != r0},
        "alpha_pattern": {hf: alphas[hf] for hf in groups if (ranks[hf], alphas[hf]) != (r0, a0)},
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / SIDECAR).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return notes


def _saved_overrides(
    model: GPT2, spec: AdapterSpec, groups: dict[str, dict], tensors: dict[str, torch.Tensor], source: str
) -> list[str]:
    """Base tensors the adapter replaces (read from another PEFT adapter's modules_to_save), saved the same way."""
    extra = [k for k in spec.overrides if not k.startswith("final_norm.")]
    if not extra:
        return []
    ours_to_hf = {o: hf for hf, (ours, _) in key_map(model.cfg).items() for o in ours}
    modules = sorted({ours_to_hf[k].rsplit(".", 1)[0] for k in extra if k in ours_to_hf})
    body = hf_state_dict(model.cfg, _plain_state(model))
    for module in modules:
        if f"transformer.{module}" in groups:
            raise UserError(
                f"{source} both replaces and adapts transformer.{module}, which PEFT cannot hold; export --format merged"
            )
        tensors |= {f"{PREFIX}transformer.{k}": v for k, v in body.items() if k.startswith(module + ".")}
    return [f"transformer.{m}" for m in modules]


def _base_ref(model: GPT2, spec: AdapterSpec, out: Path, final: Path, base: str | None, notes: list[str]) -> str:
    """base_model_name_or_path: the hub repo, the local base directory, or for random weights a copy of them in
    base-model/, named by its absolute path (transformers reads a relative one from the working directory)."""
    if base is not None:
        return str(Path(base).resolve())
    if spec.base.source != "random":
        return spec.base.source
    where = out / "base-model"  # the body as training drew it (the PEFT export leaves it unmerged)
    where.mkdir()
    # score: zeros, the right shape, so that transformers loads the base without a "score.weight MISSING"
    # report; the adapter's own score (modules_to_save) replaces it.
    zeros = torch.zeros(len(spec.labels), model.cfg.emb_dim)
    write_classifier(model.cfg, spec, hf_state_dict(model.cfg, _plain_state(model)), zeros, where)
    write_tokenizer(where, spec)
    home = final.resolve()
    (out / "README.md").write_text(MOVED.format(name=final.name, base=spec.base.describe(), home=home))
    notes.append(
        f"the base model has random weights ({spec.base.describe()}); they are written to {final / 'base-model'}, "
        f"which adapter_config.json names by its absolute path. If you move {final}, load the base from its "
        f"base-model/ yourself: PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
        f"'NEW/base-model'), 'NEW') (README.md in the export says the same; lora-dist classify reads it anywhere)"
    )
    return str(home / "base-model")


MOVED = """# {name}: a PEFT LoRA adapter written by `lora-dist export`

For transformers' `GPT2ForSequenceClassification`. Its base, {base}, is the folder `base-model/` beside this
file; `adapter_config.json` names it by its absolute path, `{home}/base-model`.

Where it was written:

```python
from peft import AutoPeftModelForSequenceClassification
model = AutoPeftModelForSequenceClassification.from_pretrained("{home}")
```

Moved or copied elsewhere (to `NEW`), that path is gone: load the base from `base-model/` yourself.

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base = AutoModelForSequenceClassification.from_pretrained("NEW/base-model")
model = PeftModel.from_pretrained(base, "NEW").eval()
tok = AutoTokenizer.from_pretrained("NEW")  # pass truncation=True: the adapter's maximum length is set
```

`lora-dist classify --adapter NEW` and `lora_dist.Classifier.from_pretrained("NEW")` read it wherever it is.
"""


def write_tokenizer(out: Path, spec: AdapterSpec) -> None:
    """GPT-2's tokenizer files (vocab.json, merges.txt: the BPE lora-dist ships), padding with <|endoftext|>."""
    assets = resources.files("lora_dist") / "assets"
    (out / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
    (out / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
    eot = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": spec.max_length,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
        "padding_side": "right",
        "truncation_side": "right",
    }
    if spec.pad_token_id == 50256:
        config["pad_token"] = eot
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
