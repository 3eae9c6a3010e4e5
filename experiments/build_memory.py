"""Builds each conversation's per-speaker memory banks and saves them under the workdir.

    python experiments/build_memory.py --config=experiments/configs/evaluate_locomo_smollm2.py \
        --workdir=runs/locomo_smollm2

Uses the ``memory`` section and the data selection (``benchmark``, ``split``, subset limits) of
an evaluate config. Banks go to
``<workdir>/memory/<sample_id>/`` (or ``config.memory.dir``): ``memory.json`` (texts, timestamps,
build statistics incl. invalid ops by reason) + ``banks.npz`` (the bank tensors), written to a
temporary folder, renamed into place, then marked ``DONE``. A rerun skips conversations that
are done, so an interrupted build resumes where it stopped; ``evaluate.py`` with the same
workdir loads them. ``manager.json`` records who built them (see ``evaluate.py``); banks of an
RL manager (``memory.manager_checkpoint``) are built by ``evaluate.py`` itself.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

from mr1.agents.pipeline import (
    MemoryBuilder,
    PipelineConfig,
    build_all,
    claim_memory_dir,
    manager_identity,
)
from mr1.data.select import select_conversations
from mr1.entry import run_main
from mr1.run_identity import check_directory
from mr1.memory.embedder import load_embedder
from mr1.parallel import maybe_initialize_distributed, process_zero_first

_CONFIG = config_flags.DEFINE_config_file("config", None, "evaluate/build config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mr1_evaluate", "output directory")


def run(config, workdir, *, policy=None, embedder=None, generate_fn=None, log=print) -> dict:
    """Builds (or resumes) the banks of the selected conversations; returns their stats."""
    t0 = time.time()
    if config.memory.get("manager_checkpoint", ""):
        raise ValueError("build_memory.py builds with the loaded model only; run evaluate.py "
                         "to build banks with --config.memory.manager_checkpoint")
    workdir = check_directory(workdir)   # a file: one line (mr1.entry)
    directory = pathlib.Path(config.memory.dir or workdir / "memory")
    claim_memory_dir(directory, manager_identity(config))
    cfg = PipelineConfig.from_mapping(config.memory)
    convs = [c for c, _ in select_conversations(config)]   # config.benchmark's data
    if policy is None:   # its tokenizer also fills the bank tensors, as evaluate.py does
        from mr1.models.trained import load_policy_from_config
        policy = load_policy_from_config(config)
    builder = MemoryBuilder(cfg, embedder or load_embedder(), policy, generate_fn=generate_fn)
    mems = process_zero_first(  # several hosts: process 0 builds, the others load its banks
        lambda: build_all(builder, convs, directory, progress=config.progress, log=log),
        "build_memory: banks built")
    stats = {k: m.stats.to_dict() for k, m in mems.items()}
    log(json.dumps(stats, indent=1))
    log(f"{len(mems)} conversations in {directory} ({time.time() - t0:.1f} s)")
    return stats


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    maybe_initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    run_main(main)  # user errors: one line, exit 2 (mr1.entry)
