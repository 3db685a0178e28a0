"""The `keras-lowrank` command: argument parsing only.

This module lives outside the `keras_lowrank` package on purpose: importing
the package imports Keras (and with it a backend), which `--help` and usage
errors must not wait for. The work itself is in `keras_lowrank.cli`, imported
once the arguments are known and `--backend` has set `KERAS_BACKEND`.

    keras-lowrank report MODEL.keras [--json]
    keras-lowrank merge IN.keras OUT.keras [--quantized ...] [--force]
    keras-lowrank spectrum BASE TUNED [--targets ...] [--plot out.png] [--json]
    keras-lowrank extract BASE TUNED OUT.safetensors (--rank N | --energy F)
    keras-lowrank peft import BASE ADAPTER_DIR OUT.keras [--name NAME]
    keras-lowrank peft export MODEL.keras OUT_DIR [--name NAME]
    keras-lowrank bench [options]     # the benchmark; `bench --help`

Exit codes: 0 done, 1 the work failed (the message says why), 2 usage error.
"""

import argparse
import os
import sys

BACKENDS = ("jax", "tensorflow", "torch")


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-lowrank",
        description="keras_lowrank command-line tools: inspect, merge, "
        "measure and extract low-rank adapters. BASE/TUNED/MODEL are .keras "
        "files or KerasHub preset folders.",
    )
    parser.add_argument("--backend", choices=BACKENDS,
                        help="the Keras backend (default: KERAS_BACKEND, else jax)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("report", help="what was adapted, at what cost")
    p.add_argument("model", help="a .keras file")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("merge", help="merge the adapters into a plain Keras file")
    p.add_argument("input", help="an adapted .keras file")
    p.add_argument("output", help="the plain .keras file to write")
    p.add_argument("--quantized", choices=["error", "dequantize", "requantize"],
                   default="error", help="what to do with quantized kernels "
                   "(see keras_lowrank.unload)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")

    p = sub.add_parser("spectrum", help="singular values of each layer's update")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--targets", help="comma-separated layer names or patterns")
    p.add_argument("--ranks", type=_ranks, default="1,2,4,8,16,32,64",
                   help="ranks of the energy columns (default %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="also draw the spectra here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("extract", help="a full fine-tune as a LoRA adapter file")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("output", help="the adapter file to write (.safetensors)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="one rank for every layer")
    size.add_argument("--energy", type=float,
                      help="per-layer rank keeping this share of the energy")
    p.add_argument("--targets", help="comma-separated layer names or patterns")
    p.add_argument("--name", default="extracted", help="the adapter's name")
    p.add_argument("--keep-changed", action="store_true",
                   help="keep the other changed weights (biases, norms, head)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("peft", help="Hugging Face PEFT adapter folders in and out")
    peft = p.add_subparsers(dest="peft_command", metavar="{import,export}")
    q = peft.add_parser("import", help="apply a PEFT folder to BASE, save a .keras file")
    q.add_argument("base")
    q.add_argument("adapter_dir")
    q.add_argument("output", help="the adapted .keras file to write")
    q.add_argument("--name", help="the adapter's name (default: 'default')")
    q.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    q = peft.add_parser("export", help="write an adapter as a PEFT folder")
    q.add_argument("model", help="an adapted .keras file")
    q.add_argument("output_dir", help="the folder to write (replaced as a whole)")
    q.add_argument("--name", help="the adapter to export (default: the only one)")
    q.add_argument("--force", action="store_true",
                   help="replace OUTPUT_DIR if it exists and is not empty")

    sub.add_parser("bench", help="the benchmark (options: keras-lowrank bench --help)",
                   add_help=False)
    return parser


def _ranks(text):
    """`--ranks 1,2,4`: positive integers, else a usage error."""
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers")
    return ranks


def _check(parser, args):
    """Usage errors found without Keras: exit 2 with argparse's message."""
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2)
    if args.command == "peft" and args.peft_command is None:
        parser.error("peft needs a subcommand: import or export")
    outputs = {"merge": (".keras",), "extract": (".safetensors",)}
    if args.command == "peft" and args.peft_command == "import":
        outputs["peft"] = (".keras",)
    suffixes = outputs.get(args.command)
    if suffixes and not args.output.endswith(suffixes):
        parser.error(f"OUTPUT {args.output!r} must end with {suffixes[0]}")
    if args.command == "extract":
        if args.rank is not None and args.rank < 1:
            parser.error(f"--rank must be a positive integer, got {args.rank}")
        if args.energy is not None and not 0.0 < args.energy <= 1.0:
            parser.error(f"--energy must be in (0, 1], got {args.energy}")
    force = getattr(args, "force", True)
    if suffixes and not force and os.path.exists(args.output):
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    output = getattr(args, "output", None) or getattr(args, "output_dir", None)
    if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        parser.error(f"the folder of {output!r} does not exist; create it first")
    if args.command == "peft" and args.peft_command == "export" and not force:
        # export_peft_adapter replaces the folder with everything in it.
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
            parser.error(f"{args.output_dir} exists and is not empty; pass "
                         "--force to replace it and everything in it")


def _command_index(argv):
    """Where the command is in `argv`: after the global options."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):
        at += 2 if argv[at] == "--backend" else 1
    return at


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    at = _command_index(argv)
    if argv[at:at + 1] == ["bench"]:
        # The benchmark parses its own options (its --backend runs children);
        # only the global options before `bench` are parsed here.
        args = parser.parse_args(argv[:at + 1])
        if args.backend:
            os.environ["KERAS_BACKEND"] = args.backend
        from keras_lowrank.bench import main as bench_main

        return bench_main(argv[at + 1:])
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from keras_lowrank import cli

    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
