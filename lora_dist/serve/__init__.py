"""`lora-dist serve`: many adapters over one frozen base behind HTTP (the `[serve]` extra).

    lora-dist serve --adapters spam=runs/a,support=runs/b

`command.py` is the command, `app.py` the HTTP API (FastAPI), `batcher.py` the dynamic batcher and
`metrics.py` its Prometheus metrics. It runs `infer.MultiAdapterClassifier`; it never imports training.
"""
