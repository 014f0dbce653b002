"""`lora-dist serve` with a stand-in model: the service's own behaviour (batches, queue, failures, shutdown), real
HTTP, no torch forward pass. Used by tests/test_serve.py.

    FAKE_MODEL_DIR=/tmp/x python tests/serve_stand_in.py serve --adapters spam=runs/smoke --port 0

The model labels each message with its own text, so a test can tell whose answer is whose, and appends each
batch it is given to $FAKE_MODEL_DIR/batches.jsonl. A batch holding the message "boom" fails whole, as a real
model fails on one bad row. A message "hold:NAME" makes the batch wait until the file $FAKE_MODEL_DIR/NAME
exists (60 s at most). With FAKE_MODEL_WARMUP=fail the warm-up fails, after the model was built.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lora_dist.cli import main
from lora_dist.infer import multi_adapter

DIR = Path(os.environ["FAKE_MODEL_DIR"])


class Model:
    device = "cpu"
    precision = "fp32"  # what MultiAdapterClassifier says it computes in

    def predict(self, texts, adapters, batch_size=None):
        with (DIR / "batches.jsonl").open("a") as f:
            f.write(json.dumps(texts) + "\n")
        if os.environ.get("FAKE_MODEL_WARMUP") == "fail" and "warm up" in texts:
            raise RuntimeError("CUDA out of memory (stand-in)")
        for t in texts:
            if t.startswith("hold:"):
                end = time.monotonic() + 60
                while not (DIR / t.removeprefix("hold:")).exists() and time.monotonic() < end:
                    time.sleep(0.01)
        if "boom" in texts:
            raise RuntimeError("index out of range in self (stand-in)")
        return [{"label": t, "probs": {t: 1.0}} for t in texts]


multi_adapter.MultiAdapterClassifier.from_loaded = staticmethod(lambda *args, **kwargs: Model())

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
