"""The Colab notebook runs top to bottom offline (real MiniLM and BBC News instead of the hub), so it cannot rot."""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # executes the Colab notebook in a kernel (~55 s): `make test-all`

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "pema_colab.ipynb"


def test_colab_notebook_executes_offline(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from helpers import real_assets

    real_assets.minilm_dir()  # skipped (or failing under PEMA_REQUIRE_ASSETS) without the offline assets
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {"PEMA_NOTEBOOK_OFFLINE": "1", "PEMA_NOTEBOOK_STEPS": "4", "PEMA_NOTEBOOK_TRAIN": "48"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # Run from a scratch folder: the notebook writes its figure to the working directory, never to examples/.
        # It finds examples/assets.py through the editable install of this clone.
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "used U =" in outputs and "| PEMA |" in outputs
    line = next(x for x in outputs.splitlines() if x.startswith("largest |restored PEMA"))
    assert float(line.split(":")[-1]) < 1e-4  # the restored PEMA model equals full fine-tuning
    assert (tmp_path / "pema_colab_results.png").exists()
