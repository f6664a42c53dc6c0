"""`python -m qflax`: the demo's numbers and the CLI's usage errors."""

import subprocess
import sys

import pytest

from qflax import cli, demo


def test_matrix_demo_reports_honest_numbers():
    rows = {r["format"]: r for r in demo.matrix_demo_rows(256, 256)}
    assert rows["float32"]["mean_abs_error"] == 0.0
    assert rows["nf4 (double quant)"]["bits_per_weight"] < rows["nf4"]["bits_per_weight"] < 4.6
    assert rows["int8 (row-wise)"]["mean_abs_error"] < rows["nf4"]["mean_abs_error"] < rows["fp4"]["mean_abs_error"]
    assert 0.06 < rows["nf4"]["mean_abs_error"] < 0.08  # NF4 blocksize 64 on randn


@pytest.mark.parametrize("argv", [["bogus"], ["demo", "--nope"], []])
def test_bad_command_line_exits_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: python -m qflax" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "qflax", "demo", "--rows", "64", "--cols", "64"], capture_output=True, text=True, check=True
    )
    assert "nf4" in out.stdout and "int8" in out.stdout
