"""The serving benchmark keeps working: one tiny run per backend through
`keras-lowrank bench --workloads serving`, its output's structure, and the
results it checks itself (mixed rows equal each adapter run alone). No
figure is checked against a bound here."""

import json

import keras
import pytest

from keras_lowrank import bench
from keras_lowrank.bench import serving


@pytest.fixture(scope="module")
def tiny_serving(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_serving")
    args = bench.parse_args(["--tiny", "--quiet", "--workloads", "serving",
                             "--out", str(out)])
    return bench.run(args), out


def test_serving_is_not_a_default_workload():
    assert "serving" not in bench.parse_args([]).workloads.split(",")
    plan = bench.build_plan(tiny=True, workloads=("serving",))
    assert plan == []  # measured by bench.serving, not by the runner


def test_tiny_serving_run_writes_json_and_markdown(tiny_serving):
    result, out = tiny_serving
    backend = keras.backend.backend()
    with open(out / f"bench-{backend}.json") as f:
        saved = json.load(f)
    assert saved["records"] == []
    assert set(saved["serving"]) == set(serving.PARTS)
    text = (out / f"bench-{backend}.md").read_text()
    for needle in ("**Serving: classifier**", "**Serving: generate**",
                   "`loop_unstacked_cold`", "`switch_stacked`",
                   "mixed-batch throughput / single-adapter throughput"):
        assert needle in text


def test_every_entry_timed_and_every_ratio_computed(tiny_serving):
    result, _ = tiny_serving
    for part in serving.PARTS:
        found = result["serving"][part]
        names = {top for _, top, _, _, _, _ in serving.RATIOS[part]} | {
            bottom for _, _, bottom, _, _, _ in serving.RATIOS[part]}
        assert names <= set(found["times"])
        assert set(found["times"]) <= set(serving.DESCRIPTIONS)
        for t in found["times"].values():
            assert t["median_ms"] > 0 and t["n"] >= 2
        assert set(found["ratios"]) == {r[0] for r in serving.RATIOS[part]}
        assert all(v > 0 for v in found["ratios"].values())
    goals = result["serving"]["classifier"]["goals"]
    assert goals["mixed_throughput_vs_single"] == ["min", 0.8]
    assert goals["mixed_speedup_vs_loop_unstacked"] == ["min", 3.0]


def test_mixed_rows_equal_each_adapter_alone(tiny_serving):
    result, _ = tiny_serving
    checks = result["serving"]["classifier"]["checks"]
    # The adapters really differ, so equality below is not trivial.
    assert checks["adapters_differ_max_abs"] > 1e-4
    assert checks["mixed_vs_adapters_max_abs"] < 1e-5
    assert checks["loop_stacked_vs_unstacked_max_abs"] < 1e-5
    checks = result["serving"]["generate"]["checks"]
    assert checks["adapters_differ_tokens"] > 0
    assert checks["stacked_vs_unstacked_tokens_differing"] == 0
    assert checks["mixed_vs_adapters_tokens_differing"] == 0


def test_combine_adds_a_serving_table_across_backends(tiny_serving):
    result, out = tiny_serving
    backend = keras.backend.backend()
    table = serving.across_backends([result, result]).splitlines()
    assert table[0] == f"| ratio | {backend} | {backend} |"
    assert len(table) == 2 + sum(len(r) for r in serving.RATIOS.values())
    bench.combine(str(out), (backend,))
    assert "**Serving: generate**" in (out / "bench.md").read_text()
