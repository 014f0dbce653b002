"""`python -m lora_dist ...` is `lora-dist ...` (torchrun runs it as `torchrun ... -m lora_dist train ...`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
