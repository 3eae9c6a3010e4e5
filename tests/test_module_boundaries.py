"""Which module needs which: evaluation loads trained models without the RL trainer, and the
names that moved out of the trainer, the pipeline and metrics_io stay importable there."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_does_not_import_the_trainer():
    code = ("import sys; sys.path.insert(0, 'experiments'); import evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('mr1.rl')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_moved_names_stay_importable():
    from mr1.agents import pipeline
    from mr1.data import select
    from mr1.eval import plots
    from mr1 import metrics_io
    from mr1.models import trained
    from mr1.rl import trainer

    for name in ("load_policy_from_config", "load_trained_params", "run_config", "lora_rank"):
        assert getattr(trainer, name) is getattr(trained, name)
    for name in ("select_locomo", "select_conversations", "benchmark_name",
                 "benchmark_categories", "subset", "BENCHMARKS"):
        assert getattr(pipeline, name) is getattr(select, name)
    for name in ("op_counts_from_results", "plot_op_distribution"):
        assert getattr(metrics_io, name) is getattr(plots, name)
