"""The benchmark keeps working: one tiny run per backend, and one memory
worker process. (It is a script, not a timed test: no figure is checked
against a bound here.)"""

import json
import os

import keras
import pytest

from keras_lowrank import bench
from keras_lowrank.bench import report
from keras_lowrank.bench import runner


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = bench.parse_args(["--tiny", "--quiet", "--out", str(out)])
    return bench.run(args), out


def test_tiny_run_writes_markdown_json_and_plot(tiny_result):
    result, out = tiny_result
    backend = keras.backend.backend()
    for ext in ("md", "json", "png"):
        assert os.path.getsize(out / f"bench-{backend}.{ext}") > 0
    with open(out / f"bench-{backend}.json") as f:
        saved = json.load(f)
    assert saved["meta"]["backend"] == backend
    text = (out / f"bench-{backend}.md").read_text()
    for needle in ("keras_lowrank LoRA", "Keras enable_lora", "floor",
                   "adapted, merged", "Rank sweep", "Width sweep",
                   "interleaved rounds x"):
        assert needle in text


def test_tiny_run_has_every_case_and_ratio(tiny_result):
    result, _ = tiny_result
    records = [r for r in result["records"] if r["role"] == "compare"]
    cases = {r["case"] for r in records}
    assert cases == {"full", "floor", "builtin", "lowrank", "dora", "base",
                     "unmerged", "merged"}
    by_case = {r["case"]: r for r in records}
    lowrank, builtin = by_case["lowrank"], by_case["builtin"]
    # Same layers, same rank: keras_lowrank's true rank-r factors on the
    # tiny model's Dense and EinsumDense layers.
    assert 0 < lowrank["trainable_params"] <= builtin["trainable_params"]
    assert by_case["floor"]["trainable_params"] < lowrank["trainable_params"]
    assert set(lowrank["ratios"]["step_ms"]) == {"full", "builtin", "floor",
                                                 "lowrank"}
    # DoRA adds one trainable magnitude per output unit of each adapted layer
    # and is judged against LoRA on the same targets and rank.
    dora = by_case["dora"]
    assert dora["trainable_params"] > lowrank["trainable_params"]
    assert dora["ratios"]["step_ms"]["lowrank"] > 0
    assert by_case["merged"]["ratios"]["step_ms"]["base"] > 0
    opt = lowrank["figures"]["optimizer_state_mib"] * 2**20
    # Adam keeps two float32 slots per trainable weight.
    assert opt == pytest.approx(8 * lowrank["trainable_params"])


def test_memory_worker_measures_one_entry_in_its_own_process():
    plan = bench.build_plan(tiny=True, workloads=("compare",))
    item = runner.entry("lowrank", "all_linear", 2)
    result = runner.memory_in_worker(plan[0], item, steps=1, warmup=1)
    assert result["peak_rss_bytes"] > 0
    assert result["memory_method"]


def test_report_combines_records_without_keras(tiny_result):
    result, out = tiny_result
    bench.combine(str(out), (keras.backend.backend(),))
    assert "keras_lowrank LoRA" in (out / "bench.md").read_text()
    checks = report.target_checks(result["records"])
    assert checks and all(len(c) == 4 for c in checks)
    measured = {text: value for text, value, _, _ in checks}
    assert measured["DoRA: step <= 1.15x LoRA (all linear)"] > 0
    # The cross-backend table: one row per target, one column per result,
    # a ratio where the tiny run measured one, "–" where it did not (q/v).
    table = report.targets_across_backends([result, result]).splitlines()
    backend = keras.backend.backend()
    assert table[0] == f"| target | {backend} | {backend} |"
    assert len(table) == 2 + len(report.TARGETS)
    dora_row = next(line for line in table if "DoRA: step <= 1.15x LoRA (all linear)" in line)
    assert dora_row.count("x ✓") + dora_row.count("x ✗") == 2
    assert "| – | – |" in next(line for line in table if "query/value: step" in line)
