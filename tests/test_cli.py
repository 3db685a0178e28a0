"""The `keras-lowrank` command: fast help, exit codes, messages, the work.

Most cases call `keras_lowrank_cli.main` in this process (Keras is already
imported here, so `--backend` has no effect and the backend is pytest's);
two run the installed command in a child process: the help must not import
Keras or a backend, and the real entry point must run end to end.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_lowrank
import keras_lowrank_cli

SUBCOMMANDS = [["report"], ["merge"], ["spectrum"], ["extract"], ["peft"],
               ["peft", "import"], ["peft", "export"]]


def _child(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_help_is_fast_and_imports_no_backend():
    done = _child(f"""
        import sys, time
        start = time.perf_counter()
        import keras_lowrank_cli
        for argv in [["--help"]] + [c + ["--help"] for c in {SUBCOMMANDS!r}]:
            try:
                keras_lowrank_cli.main(argv)
            except SystemExit as exit:
                assert exit.code == 0, (argv, exit.code)
        seconds = time.perf_counter() - start
        loaded = [m for m in ("keras", "jax", "tensorflow", "torch", "keras_lowrank")
                  if m in sys.modules]
        print("RESULT", seconds, loaded, file=sys.stderr)
    """)
    assert done.returncode == 0, done.stderr
    line = [l for l in done.stderr.splitlines() if l.startswith("RESULT")][0]
    seconds, loaded = line.split(" ", 2)[1:]
    assert float(seconds) < 1.0
    assert loaded == "[]"
    for name in ("report", "merge", "spectrum", "extract", "peft", "bench"):
        assert name in done.stdout


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        keras_lowrank_cli.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["extract", "a.keras", "b.keras", "o.safetensors"],
     "one of the arguments --rank --energy is required"),
    (["extract", "a.keras", "b.keras", "o.safetensors", "--rank", "2", "--energy", "0.9"],
     "argument --energy: not allowed with argument --rank"),
    (["extract", "a.keras", "b.keras", "o.safetensors", "--energy", "1.5"],
     r"--energy must be in \(0, 1\], got 1.5"),
    (["extract", "a.keras", "b.keras", "o.safetensors", "--rank", "0"],
     "--rank must be a positive integer, got 0"),
    (["extract", "a.keras", "b.keras", "o.npz", "--rank", "2"],
     "OUTPUT 'o.npz' must end with .safetensors"),
    (["merge", "a.keras", "out.h5"], "OUTPUT 'out.h5' must end with .keras"),
    (["peft"], "peft needs a subcommand: import or export"),
    (["spectrum", "a.keras", "b.keras", "--ranks", "1,x"],
     "argument --ranks: '1,x' is not a comma-separated list of positive integers"),
    (["merge", "a.keras", "no-such-folder/out.keras"],
     "the folder of 'no-such-folder/out.keras' does not exist; create it first"),
    (["--backend", "jax", "merge", "a.keras", "no-such-folder/out.keras"],
     "the folder of 'no-such-folder/out.keras' does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    import re

    err = _usage_error(capsys, argv)
    assert err.startswith("usage: keras-lowrank")
    assert re.search("keras-lowrank.*: error: .*" + message, err), err


def test_no_command_prints_help_and_exits_2(capsys):
    err = _usage_error(capsys, [])
    assert "COMMAND" in err and "report" in err


def _models(tmp_path):
    """A plain base file, an adapted file and a full fine-tune of the base."""
    def build():
        return keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(12, name="hidden"),
            keras.layers.Dense(3, name="out"),
        ], name="cli_model")
    base = build()
    paths = {"base": str(tmp_path / "base.keras"), "adapted": str(tmp_path / "adapted.keras"),
             "full": str(tmp_path / "full.keras")}
    base.save(paths["base"])
    full = build()
    full.set_weights([w + 0.05 * np.random.default_rng(i).normal(size=w.shape)
                      for i, w in enumerate(base.get_weights())])
    full.save(paths["full"])
    adapted = keras_lowrank.load_model(paths["base"])
    keras_lowrank.adapt(adapted, rank=2, targets=["hidden"])
    b = adapted.layers[0].adapter_variables("default")["B"]
    b.assign(np.ones(b.shape, "float32"))
    adapted.save(paths["adapted"])
    return paths


X = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")


def test_report_and_merge(tmp_path, capsys):
    paths = _models(tmp_path)
    assert keras_lowrank_cli.main(["report", paths["adapted"]]) == 0
    out = capsys.readouterr()
    assert "hidden" in out.out and "loading" in out.err
    assert keras_lowrank_cli.main(["report", paths["adapted"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["path"] == "hidden"
    merged = str(tmp_path / "merged.keras")
    assert keras_lowrank_cli.main(["merge", paths["adapted"], merged]) == 0
    plain = keras.saving.load_model(merged)  # plain Keras, no keras_lowrank classes
    assert type(plain.layers[0]) is keras.layers.Dense
    want = keras_lowrank.load_model(paths["adapted"]).predict(X, verbose=0)
    np.testing.assert_allclose(plain.predict(X, verbose=0), want, atol=1e-5)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(merged).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    err = _usage_error(capsys, ["merge", paths["adapted"], merged])
    assert f"{merged} exists; pass --force to overwrite it" in err
    assert keras_lowrank_cli.main(["merge", paths["adapted"], merged, "--force"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["report", "missing.keras"], "no such file or folder: 'missing.keras'"),
    (["report", "{base}x"], "is not a .keras file or a preset folder"),
    (["merge", "{base}", "{tmp}/m.keras"], "model 'cli_model' has no adapters"),
    (["spectrum", "{base}", "{base}"], None),
    (["extract", "{base}", "{base}", "{tmp}/x.safetensors", "--rank", "2"],
     "nothing to extract"),
])
def test_work_failures_exit_1_with_one_line(tmp_path, capsys, argv, message):
    paths = _models(tmp_path)
    open(paths["base"] + "x", "w").close()
    argv = [a.format(base=paths["base"], tmp=tmp_path) for a in argv]
    code = keras_lowrank_cli.main(argv)
    err = capsys.readouterr().err
    if message is None:  # identical models: an empty spectrum, not an error
        assert code == 0
        return
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("keras-lowrank: error: ") and message in last, err
    assert "Traceback" not in err


def test_peft_export_refuses_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    err = _usage_error(capsys, ["peft", "export", "m.keras", str(tmp_path)])
    assert f"{tmp_path} exists and is not empty; pass --force to replace it" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_global_options_before_bench_pass_through(capsys, monkeypatch):
    backend = keras.backend.backend()
    monkeypatch.setenv("KERAS_BACKEND", backend)
    with pytest.raises(SystemExit) as exit:
        keras_lowrank_cli.main(["--backend", backend, "bench", "--help"])
    assert exit.value.code == 0
    assert "--tiny" in capsys.readouterr().out  # the benchmark's own help


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        keras_lowrank_cli.main(["--debug", "report", "missing.keras"])


def test_spectrum_and_extract(tmp_path, capsys):
    paths = _models(tmp_path)
    png = str(tmp_path / "s.png")
    assert keras_lowrank_cli.main(["spectrum", paths["base"], paths["full"], "--json",
                                   "--plot", png]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["path"] for layer in data["layers"]] == ["hidden", "out"]
    assert os.path.getsize(png) > 1000
    assert keras_lowrank_cli.main(["spectrum", paths["base"], paths["full"],
                                   "--targets", "hidden", "--ranks", "1,2"]) == 0
    table = capsys.readouterr().out
    assert "r=2" in table and "out " not in table
    out = str(tmp_path / "x.safetensors")
    assert keras_lowrank_cli.main(["extract", paths["base"], paths["full"], out,
                                   "--rank", "8", "--keep-changed", "--name", "task"]) == 0
    assert "adapter 'task'" in capsys.readouterr().out
    fresh = keras_lowrank.load_model(paths["base"])
    keras_lowrank.load_adapter(fresh, out)
    full = keras.saving.load_model(paths["full"])
    np.testing.assert_allclose(fresh.predict(X, verbose=0), full.predict(X, verbose=0),
                               atol=1e-4)


@pytest.mark.slow
def test_the_installed_command_runs_in_a_fresh_process(tmp_path):
    paths = _models(tmp_path)
    env = {**os.environ}
    done = subprocess.run(["keras-lowrank", "report", paths["adapted"]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hidden" in done.stdout
    done = subprocess.run(["keras-lowrank", "report", "missing.keras"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    module = subprocess.run([sys.executable, "-m", "keras_lowrank.cli", "report", "--help"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert module.returncode == 0 and "--json" in module.stdout, module.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "keras-lowrank: error: no such file or folder: 'missing.keras'. Pass a "
        ".keras file or a KerasHub preset folder."
    )
