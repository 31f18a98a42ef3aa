"""bench/quality_vs_nfe.py: the chart's numbers are BENCHMARKS.md's, and it draws them."""

import json
import os
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import quality_vs_nfe  # noqa: E402

DATA = os.path.join(REPO_ROOT, "bench", "quality_vs_nfe.json")


def test_every_number_is_in_the_benchmarks_table_it_cites():
    benchmarks = open(os.path.join(REPO_ROOT, "BENCHMARKS.md"), encoding="utf-8").read()
    data = quality_vs_nfe.load_series(DATA)
    assert {s["kind"] for s in data["series"]} == {"sampler", "student"}
    for series in data["series"] + data["floors"]:
        assert series["source"].startswith("BENCHMARKS.md, ") and "python " in series["source"], series["name"]
        for fd in series.get("fd") if isinstance(series["fd"], list) else [series["fd"]]:
            assert f"| {fd:.4f} |" in benchmarks or f"| **{fd:.4f}** |" in benchmarks, (series["name"], fd)


def test_chart_is_drawn_and_bad_data_is_one_error_line(tmp_path):
    out = str(tmp_path / "chart.png")
    result = CliRunner().invoke(quality_vs_nfe.main, [f"--out={out}", "--dpi=40"])
    assert result.exit_code == 0, result.output
    assert "| builtin:glyphs16 | PID student (default run, one call) | 1 | 2.231 |" in result.output
    with Image.open(out) as image:
        assert image.size == (440, 400)                     # 11 x 5 inches per teacher panel (2) at 40 dpi
    bad = json.load(open(DATA))
    bad["series"][0]["fd"] = bad["series"][0]["fd"][:-1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = CliRunner().invoke(quality_vs_nfe.main, [f"--data={path}", f"--out={out}"])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "one length" in result.output


@pytest.mark.parametrize("field", ["source", "nfe"])
def test_a_series_without_its_source_or_numbers_is_refused(tmp_path, field):
    data = json.load(open(DATA))
    del data["series"][-1][field]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(quality_vs_nfe.DataError, match=field):
        quality_vs_nfe.load_series(str(path))
