"""Evaluation: answer metrics (``metrics``: EM, Mem0 F1 / BLEU-1, LoCoMo F1, per-category
tables) and the LLM-as-a-Judge client (``judge``)."""
