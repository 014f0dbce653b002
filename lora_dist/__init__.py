"""lora-dist: LoRA fine-tuning of GPT-2 in plain PyTorch, from one CPU process to many GPUs on many nodes.

lora-dist train --config configs/smoke.yaml
python -c "from lora_dist import Classifier; print(Classifier.from_pretrained('runs/smoke').predict(['see you at 6']))"
"""

from .config import Config, LoRAConfig, load_config
from .errors import UserError
from .infer.classifier import Classifier
from .infer.multi_adapter import MultiAdapterClassifier
from .lora import LinearWithLoRA, LoRALayer, count_params, inject_lora, merge, unmerge
from .model import GPT2, GPTConfig
from .tokenizer import get_tokenizer
from .weights import load_gpt2, save_hf_checkpoint

__version__ = "0.1.0"
__all__ = [
    "Classifier",
    "MultiAdapterClassifier",
    "Config",
    "LoRAConfig",
    "load_config",
    "UserError",
    "LinearWithLoRA",
    "LoRALayer",
    "count_params",
    "inject_lora",
    "merge",
    "unmerge",
    "GPT2",
    "GPTConfig",
    "get_tokenizer",
    "load_gpt2",
    "save_hf_checkpoint",
]
