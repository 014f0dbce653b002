"""Training: the one loop (`loop.py`), its backends (`strategy.py`, `deepspeed_strategy.py`), data loaders,
checkpoints, the learning-rate schedule, and rank 0's output (`tracking.py`, `wandb_sink.py`).

    lora-dist train --config configs/smoke.yaml
    torchrun --nproc_per_node=8 -m lora_dist train --config configs/gpt2-small-lora.yaml

Nothing outside this folder imports it but the command line (`cli.py`); see ARCHITECTURE.md.
"""
