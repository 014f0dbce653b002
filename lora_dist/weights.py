"""GPT-2 weights: download from the Hugging Face hub, read and write the `model.safetensors` layout.

    python -c "import lora_dist; lora_dist.load_gpt2('gpt2-small')"   # downloads once into the HF cache

A local directory in the hub's layout (`config.json` + `model.safetensors`) works everywhere a name does.
GPT-2's `Conv1D` weights are stored (in, out); they are transposed into `nn.Linear`'s (out, in), and the
fused `c_attn` is split into query, key and value.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import UserError
from .files import save_file, sha256, write_atomic
from .model import GPT2, HUB_REPOS, SIZES, GPTConfig, canonical_name


def load_gpt2(
    name_or_path: str,
    weights: str = "pretrained",
    *,
    dropout: float = 0.0,
    context_length: int | None = None,
    causal: bool = True,
    device: str | torch.device | None = None,
) -> GPT2:
    """GPT-2 by name ("gpt2-small", "gpt2-small (124M)", ..., "tiny") or from a local directory.

    `weights` is "pretrained" (hub download, or the directory's own file), "random", or a directory. The model
    is made on `device` (default: torch's default device): weights from a file are read straight onto it (the
    model is laid out on the meta device first, so nothing is initialised only to be overwritten); random
    weights are drawn there, from torch's generator of that device (seeded by `torch.manual_seed`).
    """
    if weights not in ("pretrained", "random"):
        return _from_dir(Path(weights), dropout, context_length, causal, device)
    if _looks_like_path(name_or_path):
        if weights == "random":
            cfg = _config_from_json(Path(name_or_path) / "config.json")
            return _random(_adjust(cfg, dropout, context_length, causal), device)
        return _from_dir(Path(name_or_path), dropout, context_length, causal, device)
    name = canonical_name(name_or_path)
    cfg = _adjust(SIZES[name], dropout, context_length, causal)
    if weights == "random":
        return _random(cfg, device)
    return _from_dir(base_dir(name, weights), dropout, context_length, causal, device)


def _random(cfg: GPTConfig, device: str | torch.device | None) -> GPT2:
    if device is None:
        return GPT2(cfg)
    with torch.device(device):
        return GPT2(cfg)


def base_dir(name: str, weights: str = "pretrained") -> Path:
    """The directory that holds the base weights: the hub download's (for "pretrained"), or `weights`."""
    if weights not in ("pretrained", "random"):
        return Path(weights)
    if _looks_like_path(name):
        return Path(name)
    name = canonical_name(name)
    if name not in HUB_REPOS:
        raise UserError(f"model {name!r} has no pretrained weights; set model.weights=random")
    return download(HUB_REPOS[name])


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.startswith(".") or Path(s).is_dir()


def _adjust(cfg: GPTConfig, dropout: float, context_length: int | None, causal: bool = True) -> GPTConfig:
    if context_length is not None and context_length > cfg.context_length:
        raise UserError(f"model.context_length={context_length} exceeds the model's {cfg.context_length}")
    return replace(cfg, drop_rate=dropout, context_length=context_length or cfg.context_length, causal=causal)


def _config_from_json(path: Path) -> GPTConfig:
    if not path.is_file():
        raise UserError(
            f"{path} not found; a weights directory needs config.json and model.safetensors (as on the Hugging Face hub)"
        )
    try:
        hf = json.loads(path.read_text())
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            emb_dim=int(hf["n_embd"]),
            n_layers=int(hf["n_layer"]),
            n_heads=int(hf["n_head"]),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e}); use the file from the hub repository"
        ) from e


def _from_dir(
    path: Path,
    dropout: float,
    context_length: int | None,
    causal: bool = True,
    device: str | torch.device | None = None,
) -> GPT2:
    if not path.is_dir():
        raise UserError(
            f"weights directory {path} not found; point model.weights at a directory with config.json + model.safetensors"
        )
    cfg = _adjust(_config_from_json(path / "config.json"), dropout, context_length, causal)
    file = path / "model.safetensors"
    if not file.is_file():
        raise UserError(
            f"{file} not found; the weights directory needs model.safetensors (pytorch_model.bin is not read: it is a pickle)"
        )
    target = torch.device(device) if device is not None else torch.get_default_device()
    try:
        state = load_file(str(file), device=str(target))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}); download it again") from e
    with torch.device("meta"):
        model = GPT2(cfg)  # the layout only: its tensors come from the file
    load_hf_state_dict(model, state, source=str(file))
    return model


def load_hf_state_dict(model: GPT2, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Put a Hugging Face GPT-2 state dict into `model` (copied into its tensors, or, for a model laid out on the
    meta device, taking their place); a missing or misshapen tensor is a UserError."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    C = model.cfg.emb_dim
    for hf_key, (our_keys, kind) in key_map(model.cfg).items():
        if hf_key not in state:
            raise UserError(f"{source} is missing tensor '{hf_key}'; it is not a complete GPT-2 checkpoint")
        for key, t in zip(our_keys, from_hf(state[hf_key], kind, len(our_keys), C), strict=True):
            if key == "pos_emb.weight" and t.shape[0] >= ours[key].shape[0]:
                t = t[: ours[key].shape[0]]  # a shortened context keeps the first positions
            if tuple(t.shape) != tuple(ours[key].shape):
                raise UserError(
                    f"tensor '{hf_key}' in {source} has shape {list(state[hf_key].shape)}, which does not fit "
                    f"this model ({key} is {list(ours[key].shape)}); the file is for another GPT-2 size"
                )
            mapped[key] = t
    if model.tok_emb.weight.is_meta:
        model.load_state_dict({k: t.contiguous() for k, t in mapped.items()}, strict=False, assign=True)
        model.head.weight = model.tok_emb.weight  # the tie: the output layer is the token embedding
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise UserError(f"{source} leaves {left[0]} unset; it is not a complete GPT-2 checkpoint")
        return
    with torch.no_grad():
        for key, t in mapped.items():
            ours[key].copy_(t)


def from_hf(t: torch.Tensor, kind: str, n: int, C: int) -> tuple[torch.Tensor, ...]:
    """One hub tensor as the `n` tensors of our keys (`key_map`'s kind: same, t or qkv)."""
    if kind in ("t", "qkv") and t.dim() == 2:
        t = t.t()  # Conv1D (in, out) -> Linear (out, in)
    tensors = t.split(C, dim=0) if kind == "qkv" and t.shape[0] == 3 * C else (t,)
    return tensors if len(tensors) == n else (t,) * n  # a misfit: the caller's shape check names it


def key_map(cfg: GPTConfig) -> dict[str, tuple[list[str], str]]:
    """HF key -> (our keys, kind): "same", "t" (Conv1D, transposed) or "qkv" (fused c_attn, split)."""
    m = {
        "wte.weight": (["tok_emb.weight"], "same"),
        "wpe.weight": (["pos_emb.weight"], "same"),
        "ln_f.weight": (["final_norm.weight"], "same"),
        "ln_f.bias": (["final_norm.bias"], "same"),
    }
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        qkv = [b + f"att.{n}" for n in ("query", "key", "value")]
        m |= {
            h + "ln_1.weight": ([b + "norm1.weight"], "same"),
            h + "ln_1.bias": ([b + "norm1.bias"], "same"),
            h + "ln_2.weight": ([b + "norm2.weight"], "same"),
            h + "ln_2.bias": ([b + "norm2.bias"], "same"),
            h + "attn.c_attn.weight": ([k + ".weight" for k in qkv], "qkv"),
            h + "attn.c_attn.bias": ([k + ".bias" for k in qkv], "qkv"),
            h + "attn.c_proj.weight": ([b + "att.out.weight"], "t"),
            h + "attn.c_proj.bias": ([b + "att.out.bias"], "same"),
            h + "mlp.c_fc.weight": ([b + "ff.fc.weight"], "t"),
            h + "mlp.c_fc.bias": ([b + "ff.fc.bias"], "same"),
            h + "mlp.c_proj.weight": ([b + "ff.proj.weight"], "t"),
            h + "mlp.c_proj.bias": ([b + "ff.proj.bias"], "same"),
        }
    return m


def save_hf_checkpoint(model: GPT2, path: str | Path) -> Path:
    """Write `model`'s body in the hub's GPT-2 layout (config.json + model.safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = hf_state_dict(model.cfg, model.state_dict())
    save_file({k: v.detach().contiguous().clone() for k, v in out.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2))
    return path


def hf_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The body of a state dict in lora-dist's names, in the hub's names and layouts (`key_map` backwards)."""
    out: dict[str, torch.Tensor] = {}
    for hf_key, (our_keys, kind) in key_map(cfg).items():
        t = torch.cat([sd[k] for k in our_keys], dim=0)
        out[hf_key] = t.t() if kind in ("t", "qkv") and t.dim() == 2 else t
    return out


def hf_config(cfg: GPTConfig) -> dict:
    """The hub's config.json for a GPT-2 of this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "tie_word_embeddings": True,
    }


# ------------------------------------------------------------------------------------------ download


def download(repo_id: str, revision: str = "main") -> Path:
    """Fetch config.json + model.safetensors into the standard HF cache (resumable) and verify them.

    Stops at once, with what it tried and how to proceed, when the hub cannot be reached and nothing is
    cached.
    """
    config, weights = (
        try_to_load_from_cache(repo_id, f, revision=revision) for f in ("config.json", "model.safetensors")
    )
    if isinstance(config, str) and isinstance(weights, str):
        _verify_blob(Path(weights))
        return Path(weights).parent
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo_id}/resolve/{revision}/config.json"
    problem: str | None = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        problem = _probe(url)
    if problem is None:
        try:
            for f in ("config.json", "model.safetensors"):
                local = hf_hub_download(repo_id, f, revision=revision)
            _verify_blob(Path(local))
            return Path(local).parent
        except UserError:
            raise
        except Exception as e:  # network, HTTP and cache errors of huggingface_hub all land here
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise UserError(
        f"cannot get the pretrained weights of {repo_id}: tried the Hugging Face cache (not there) and {url} "
        f"({problem}). Either put config.json + model.safetensors from https://huggingface.co/{repo_id} in a "
        f"directory and set model.weights=/that/directory, or run the offline smoke config: make smoke (lora-dist "
        f"train --config configs/smoke.yaml: a tiny random GPT-2, a minute on a CPU; model.weights=random on "
        f"{repo_id} learns nothing useful and takes hours there)"
    )


def _probe(url: str, timeout: float = 10.0) -> str | None:
    """One quick request, so an offline machine fails in seconds instead of retrying for a minute."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return None
    except urllib.error.HTTPError as e:
        return None if e.code in (301, 302, 307, 308) else f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"unreachable: {getattr(e, 'reason', e)}"


def _verify_blob(file: Path) -> None:
    """The HF cache names an LFS blob by its sha256: check the content against that name once."""
    blob = file.resolve()
    expected = blob.name
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        return  # not content-addressed (a small git file): nothing to check against
    marker = _cache_dir() / "verified" / expected
    if marker.exists():
        return
    if sha256(blob) != expected:
        blob.unlink()
        raise UserError(
            f"downloaded {file.name} is corrupt (sha256 mismatch); it was removed, run again to download it anew"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _cache_dir() -> Path:
    return Path(os.environ.get("LORA_DIST_CACHE", Path.home() / ".cache" / "lora_dist"))


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 of `directory/model.safetensors`: the name of its HF cache blob (content-addressed and
    checked on download), else computed once and remembered by path, size and modification time."""
    file = Path(directory) / "model.safetensors"
    if not file.is_file():
        raise UserError(f"{file} not found; the weights directory needs model.safetensors")
    blob = file.resolve()
    if len(blob.name) == 64 and all(c in "0123456789abcdef" for c in blob.name):
        return blob.name
    st = blob.stat()
    key = hashlib.sha256(f"{blob}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = _cache_dir() / "sha256" / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256(blob)
    try:
        write_atomic(memo, digest)
    except OSError:
        pass  # a read-only home: compute again next time
    return digest
