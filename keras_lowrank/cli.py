"""The `keras-lowrank` command.

    keras-lowrank bench [options]     # the benchmark; --help for options

The Keras backend is read from KERAS_BACKEND when Keras is first imported, so
`--backend` other than the current one runs the work in a child process.
"""

import argparse
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="keras-lowrank",
        description="keras_lowrank command-line tools.",
    )
    parser.add_argument("command", choices=["bench"], help="bench: the benchmark")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    if args.command == "bench":
        from keras_lowrank.bench import main as bench_main

        return bench_main(argv[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
