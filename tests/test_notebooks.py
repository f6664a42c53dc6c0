"""Every notebook in colab/ runs top to bottom on CPU in small mode and writes its plots as files."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
SPEED_NOTEBOOK = COLAB / "04_speed.ipynb"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def execute(path: Path, out: Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Runs the notebook in a fresh kernel with the small-size switch; returns the executed notebook."""
    monkeypatch.setenv("QFLAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("QFLAX_NOTEBOOK_OUT", str(out))
    # The kernel is a plain user process: no forced 8-device CPU platform from conftest.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return notebook


def text_output(notebook) -> str:
    return "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )


def test_readme_lists_exactly_the_notebooks_and_the_kernel_can_run_them():
    listed = re.findall(r"\]\(colab/([\w.]+\.ipynb)\)", (ROOT / "README.md").read_text())
    assert sorted(listed) == [p.name for p in NOTEBOOKS] and len(NOTEBOOKS) == 4
    # What the notebooks import in their kernel (the `notebooks` extra): missing is an error, not a skip.
    assert [m for m in ("ipykernel", "matplotlib") if importlib.util.find_spec(m) is None] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_badge_and_colab_install_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first, install = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown"
    assert BADGE in first.source
    assert f"/blob/main/colab/{path.name})" in first.source
    assert install.cell_type == "code"
    assert "google.colab" in install.source and "pip" in install.source
    # Committed without outputs: what a reader sees comes from their own run.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if not p.name.startswith("04_")], ids=lambda p: p.stem)
def test_notebook_runs_and_writes_plots(path, tmp_path, monkeypatch):
    notebook = execute(path, tmp_path, monkeypatch)
    assert "not on Colab" in text_output(notebook)
    plots = list(tmp_path.glob("*.png"))
    assert plots, f"{path.name} wrote no plot into {tmp_path}"
    assert all(p.stat().st_size > 1000 for p in plots)


@pytest.mark.slow
def test_speed_notebook_without_results_says_so(tmp_path, monkeypatch):
    empty = tmp_path / "results"
    empty.mkdir()
    notebook = execute(SPEED_NOTEBOOK, tmp_path / "out", monkeypatch, QFLAX_BENCH_RESULTS=str(empty))
    assert "No benchmark results exist yet" in text_output(notebook)
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_speed_notebook_plots_results_and_measures(tmp_path, monkeypatch):
    # A result file in the BENCHMARKS.md format with a bitsandbytes column, the committed result files
    # (whatever their schema), and the CPU measurement forced on.
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        dict(op="matmul_4bit", quant="nf4", M=m, K=4096, N=4096, dtype="bfloat16", ours_us=10.0 * m,
             baseline="torch bf16", baseline_us=25.0 * m, ratio=2.5, path="triton", bnb_linear4bit_us=40.0 * m,
             bnb_gemv_4bit_us=None)
        for m in (1, 16, 256)
    ]
    (results / "synthetic-h100.json").write_text(json.dumps({"device": "H100", "date": "x", "rows": rows}))
    committed = sorted((COLAB.parent / "benchmarks" / "results").glob("*.json"))
    for path in committed:
        shutil.copy(path, results / path.name)
    out = tmp_path / "out"
    notebook = execute(SPEED_NOTEBOOK, out, monkeypatch, QFLAX_BENCH_RESULTS=str(results), QFLAX_NOTEBOOK_MEASURE="1")
    names = {p.name for p in out.glob("*.png")}
    assert {"speed_synthetic-h100_time.png", "speed_synthetic-h100_speedup.png"} <= names
    assert {"speed_this_card_time.png", "speed_this_card_speedup.png"} <= names
    for path in committed:
        assert f"speed_{path.stem}_time.png" in names, f"no plot of the committed {path.name}"
    measured = json.loads((out / "speed_this_card.json").read_text())
    assert {r["M"] for r in measured["rows"]} == {1, 16}
    for row in measured["rows"]:
        # Small mode: one 256x256 shape, 2**20 bf16 bytes of weights = 8 layers, on the CPU's XLA path.
        assert (row["K"], row["N"], row["layers"], row["path"]) == (256, 256, 8, "xla")
        assert row["ratio"] == pytest.approx(row["baseline_us"] / row["ours_us"])
    assert "speed-up" in text_output(notebook)
