"""ml_collections configs for the experiments (``--config=experiments/configs/<name>.py``)."""
