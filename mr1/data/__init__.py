"""Benchmark data: LoCoMo, LongMemEval and MSC loaders, typed records, the Memory-R1 split,
and data-file resolution / download (``mr1.data.paths``).

``from mr1.data.locomo import load_locomo`` is the usual entry point; ``mr1.data.paths`` says
where files are looked up (explicit path, ``$MR1_DATA_DIR``, the ``$MR1_CACHE`` download
cache) and ``python -m mr1.data.paths download NAME`` fills the cache. Nothing is imported
here, so that ``python -m mr1.data.paths`` runs cleanly.
"""
