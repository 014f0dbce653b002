"""Inference: classify messages with trained adapters, one (`Classifier`) or many at once over one base
(`MultiAdapterClassifier`), and the commands behind them (`classify.py`, `evaluate.py`).

    lora-dist classify --adapter runs/smoke "see you at 6"
    lora-dist eval runs/smoke

It builds the model as training does (`build.py`) but never imports training.
"""
