"""The work behind the `keras-lowrank` command (parsing: `keras_lowrank_cli`).

Each `_run_<command>` takes the parsed arguments, prints progress on stderr
and results on stdout, and writes files atomically. Failures the library
reports (`ValueError`, `TypeError`, `OSError`) become one line on stderr and
exit code 1; `--debug` shows the traceback instead.

Example:

>>> import keras_lowrank_cli
>>> keras_lowrank_cli.main(["report", "missing.keras"])
1
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile


def main(argv=None):
    """`keras-lowrank` itself (kept so `keras_lowrank.cli:main` still works)."""
    import keras_lowrank_cli

    return keras_lowrank_cli.main(argv)


def run(args):
    """Runs the parsed command; returns the exit code."""
    command = args.command if args.command != "peft" else f"peft_{args.peft_command}"
    try:
        return _COMMANDS[command](args) or 0
    except (ValueError, TypeError, OSError, KeyError) as error:
        if args.debug:
            raise
        message = str(error).strip("'\"").removeprefix("keras_lowrank: ")
        print(f"keras-lowrank: error: {message}", file=sys.stderr)
        return 1


def _say(text):
    print(text, file=sys.stderr, flush=True)


def _load(path):
    from keras_lowrank.analysis import load_model_or_preset

    _say(f"loading {path} ...")
    return load_model_or_preset(path)


def _targets(text):
    return None if not text else [t.strip() for t in text.split(",") if t.strip()]


def _save_model(model, path):
    """`model.save` into a temporary folder beside `path`, then renamed over
    it (a folder, not `mkstemp`: the file gets the umask's mode, not 0600)."""
    _say(f"writing {path} ...")
    folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)),
                              prefix=".tmp-keras-lowrank-")
    try:
        tmp = os.path.join(folder, "model.keras")
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _say(f"wrote {path}")


def _run_report(args):
    import keras_lowrank

    model = _load(args.model)
    result = keras_lowrank.report(model)
    if args.json:
        data = dataclasses.asdict(result)
        print(json.dumps(data, default=list, indent=1))
    else:
        print(result)


def _run_merge(args):
    import keras_lowrank

    model = _load(args.input)
    _say("merging the adapters ...")
    keras_lowrank.unload(model, quantized=args.quantized)
    _save_model(model, args.output)


def _run_spectrum(args):
    from keras_lowrank.analysis import delta_spectrum

    base, tuned = _load(args.base), _load(args.tuned)
    _say("computing the spectra ...")
    result = delta_spectrum(base, tuned, targets=_targets(args.targets))
    print(result.to_json(indent=1) if args.json else result.table(ranks=args.ranks))
    if args.plot:
        result.plot(args.plot)
        _say(f"wrote {args.plot}")


def _run_extract(args):
    import keras_lowrank

    base, tuned = _load(args.base), _load(args.tuned)
    _say("extracting (truncated SVD per layer) ...")
    result = keras_lowrank.extract(
        base, tuned, rank=args.rank, energy=args.energy,
        targets=_targets(args.targets), name=args.name,
        keep_changed=args.keep_changed,
    )
    keras_lowrank.save_adapter(base, args.output, name=args.name)
    print(result.to_json(indent=1) if args.json else result.table())
    _say(f"wrote {args.output}")


def _run_peft_import(args):
    import keras_lowrank

    model = _load(args.base)
    _say(f"loading the PEFT adapter {args.adapter_dir} ...")
    keras_lowrank.load_peft_adapter(model, args.adapter_dir, name=args.name)
    _save_model(model, args.output)


def _run_peft_export(args):
    import keras_lowrank

    model = _load(args.model)
    keras_lowrank.export_peft_adapter(model, args.output_dir, name=args.name)
    _say(f"wrote {args.output_dir}")


_COMMANDS = {
    "report": _run_report,
    "merge": _run_merge,
    "spectrum": _run_spectrum,
    "extract": _run_extract,
    "peft_import": _run_peft_import,
    "peft_export": _run_peft_export,
}


if __name__ == "__main__":  # `python -m keras_lowrank.cli ...`
    sys.exit(main())
