"""``penctl bench``: the framework, the codec benchmark's output, the command line."""

from __future__ import annotations

import importlib
import json

import pytest

from devtools.bench.framework import BENCHMARKS, Row, judge
from penctl import cli


def test_every_registered_benchmark_has_the_interface() -> None:
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        assert isinstance(module.DESCRIPTION, str), name
        assert callable(module.run), name


def test_judge_compares_with_the_target_in_the_right_direction() -> None:
    assert "meets_target" not in judge(Row("x", 1.0, "s")).extra
    assert judge(Row("x", 600.0, "f/s", {"target": 500})).extra["meets_target"] is True
    assert judge(Row("x", 400.0, "f/s", {"target": 500})).extra["meets_target"] is False
    latency = {"target": 0.010, "higher_is_better": False}
    assert judge(Row("x", 0.004, "s", latency)).extra["meets_target"] is True


def test_codec_bench_quick_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "codec", "--quick", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # stdout holds nothing but the JSON
    assert "penctl bench" in err  # the table went to stderr
    assert {"cpu_model", "cores", "python"} <= set(doc["machine"])
    assert doc["quick"] is True
    rows = {r["name"]: r for r in doc["benchmarks"]["codec"]["rows"]}
    assert {"encode frame", "decode frames (64 B reads)"} <= set(rows)
    for row in rows.values():
        assert row["unit"] == "frames/s"
        assert row["value"] > 0
    decode = rows["decode frames (64 B reads)"]["extra"]
    assert decode["target"] == 500_000
    assert isinstance(decode["meets_target"], bool)


def test_unknown_benchmark_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark nope" in capsys.readouterr().err
