"""Benchmark data: LoCoMo, LongMemEval and MSC loaders, typed records, the Memory-R1 split,
and data-file resolution / download (``mr1.data.paths``).

``from mr1.data.locomo import load_locomo`` is the usual entry point; see ``paths`` for where
files are looked up (explicit path, ``$MR1_DATA_DIR``, the ``$MR1_CACHE`` download cache).
"""

from mr1.data.paths import DataFileError, DataNotFoundError

__all__ = ["DataFileError", "DataNotFoundError"]
