"""The Colab notebook (``launch/colab/memory_r1.ipynb``) runs top to bottom.

The notebook's ``parameters`` cell (papermill-style tag) is followed, as papermill does, by an
``injected-parameters`` cell that switches it to the tiny configs (``QUICK``: a random 2-layer
model with the embedded tokenizer, 4 GRPO steps, 2 evaluation questions), no install, no
download and a workdir under ``tmp_path``. nbclient runs it in a ``python3`` kernel, the test
pins to this interpreter (``sys.executable``) with a kernelspec of its own on ``JUPYTER_PATH``.
About a minute on an idle 2-core CPU (MiniLM embeddings, the tiny model's compiles).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab" / "memory_r1.ipynb"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_available():
    from mr1 import assets
    try:
        return assets.minilm_dir(fetch=os.environ.get("MR1_OFFLINE", "0") != "1", quiet=True)
    except assets.AssetNotFoundError as e:
        pytest.skip(f"embedded MiniLM unavailable: {e}")


def _cell_text(cell) -> str:
    """Everything a code cell printed (streams and text/plain results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_clean():
    """Committed without outputs, valid nbformat 4, a python3 kernelspec, one parameters cell."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "QUICK = False" in tagged[0].source
    assert "INSTALL = True" in tagged[0].source


def test_notebook_runs_quick(tmp_path, monkeypatch, locomo_available, embedded_gguf,
                             minilm_available):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="the notebook runs in an ipykernel python3 kernel")
    from ipykernel.kernelspec import write_kernel_spec

    # "python3" = this interpreter, whatever other python3 kernelspecs the machine has
    # (JUPYTER_PATH comes first in jupyter_client's kernelspec search)
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(tmp_path / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])]))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    workdir = tmp_path / "run"
    params = {"QUICK": True, "INSTALL": False, "REPO_DIR": str(ROOT), "WORKDIR": str(workdir),
              "DATA_DIR": "", "DOWNLOAD_DATA": False, "NUM_STEPS": None, "OVERRIDES": {}}
    source = "# Parameters injected by tests/test_notebook.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        source, metadata={"tags": ["injected-parameters"]}))

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:  # the executed notebook, for a look at a failure
        nbformat.write(nb, tmp_path / "executed.ipynb")

    # the kernel is this interpreter (so it sees this environment's mr1 and jax)
    install = next(c for c in nb.cells if 'print("python", sys.executable)' in c.source)
    printed = _cell_text(install)
    assert f"python {sys.executable}" in printed, printed

    import runpy
    steps = runpy.run_path(str(ROOT / "experiments" / "configs" / "locomo_tiny_rl.py")
                           )["get_config"]().num_steps
    with open(workdir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["step"]) for r in rows) == list(range(steps + 1))  # 0: validation
    for name in ("curves.png", "summary.json", "best.json", "eval_f1.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "best").is_dir() and (workdir / "checkpoints").is_dir()

    comparison = json.loads((workdir / "eval_comparison.json").read_text())
    assert set(comparison["tables"]) == {"base", "GRPO"}
    for name in ("base", "GRPO"):
        result = json.loads((workdir / "eval" / name / "results.json").read_text())
        assert result["num_questions"] == 2 and result["table"]["overall"]["n"] == 2
        assert comparison["tables"][name]["overall"] == result["table"]["overall"]
    assert json.loads((workdir / "eval" / "GRPO" / "results.json").read_text()
                      )["checkpoint"] == str(workdir / "best")

    # figures were shown inline, and the summary prints both overall F1 numbers
    images = sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for out in c.outputs)
    assert images >= 2  # curves.png and the F1 bar chart
    summary = next(c for c in nb.cells if "summary" in c.metadata.get("tags", []))
    text = _cell_text(summary)
    m = re.search(r"validation F1 overall \((\d+) questions\): base ([\d.]+) -> GRPO ([\d.]+)",
                  text)  # the tiny evaluation config scores conv-30
    assert m, text
    base = comparison["tables"]["base"]["overall"]["f1"]
    trained = comparison["tables"]["GRPO"]["overall"]["f1"]
    assert (int(m[1]), float(m[2]), float(m[3])) == (2, round(base, 2), round(trained, 2))
    assert f"{steps} steps" in text
