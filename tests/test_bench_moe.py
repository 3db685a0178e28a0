"""`scripts/bench_moe.py`: expert LoRA next to full fine-tuning of the
experts on a random KerasHub Mixtral.

The table comes from the script's own `main` on the current backend, with
its children run in this process (a fresh process per child would cost a
framework import each); one child also runs as the script does, in a fresh
process, to check what it prints and that only expert factors train in
the expert-LoRA case.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

pytest.importorskip("keras_hub")

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_moe  # noqa: E402

FACTOR = ("/lowrank_A_default", "/lowrank_B_default")
EXPERT_KERNELS = ("/experts/expert_feedforward_gate_dense/",
                  "/experts/expert_feedforward_intermediate_dense/",
                  "/experts/expert_feedforward_output_dense/")


def _in_process(backend, child_args):
    assert backend == keras.backend.backend()
    sizes = bench_moe.SIZES["tiny"]
    child, steps = child_args[0], int(child_args[child_args.index("--steps") + 1])
    if child == "times":
        rounds = int(child_args[child_args.index("--rounds") + 1])
        return json.loads(json.dumps(bench_moe.measure_times(sizes, rounds, steps)))
    return bench_moe.measure_memory(child, sizes, memory_steps=1)


def test_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_moe, "run_child", _in_process)
    backend = keras.backend.backend()
    out = tmp_path / "moe.json"
    bench_moe.main(["--tiny", "--backends", backend, "--rounds", "2",
                    "--steps", "1", "--memory-steps", "1", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| backend | case | trainable params |")
    assert "x full step" in table[0] and "x full peak" in table[0]
    assert [row.split(" | ")[1] for row in table[2:]] == list(bench_moe.CASES)
    assert all(row.startswith(f"| {backend} |") for row in table[2:])
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    full = rows["full_experts"]
    assert full["step_ratio"] == 1.0 and full["peak_ratio"] == 1.0
    # Full fine-tuning of the experts trains the three expert kernels only.
    assert all(p.endswith(EXPERT_KERNELS[i].rstrip("/"))
               for i, p in enumerate(full["trainable_paths"]))
    s = bench_moe.SIZES["tiny"]
    e, d, k, r = s["num_experts"], s["hidden_dim"], s["intermediate_dim"], 8
    assert full["trainable_params"] == 3 * e * d * k
    assert rows["lora_experts"]["trainable_params"] == 3 * e * r * (d + k)
    # Adam: two slots per trainable weight, float32.
    for row in rows.values():
        assert row["optimizer_state_bytes"] == 2 * 4 * row["trainable_params"]
        assert row["median_ms"] > 0 and row["peak_rss_bytes"] > 0
    qv = rows["lora_experts_qv"]["trainable_paths"]
    assert any("/query/" in p for p in qv) and any("/value/" in p for p in qv)


def test_expert_lora_child_trains_only_expert_factors():
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_moe.py"), "--child",
         "lora_experts", "--tiny", "--memory-steps", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("ROW ")][-1]
    row = json.loads(line[4:])
    paths = row["trainable_paths"]
    assert len(paths) == 6  # A and B on each of Mixtral's 3 expert kernels
    for path in paths:
        assert path.endswith(FACTOR), path
        assert any(kernel in path for kernel in EXPERT_KERNELS), path
    assert row["backend"] == keras.backend.backend()
    assert row["peak_rss_bytes"] > 0 and row["rss_before_bytes"] > 0
