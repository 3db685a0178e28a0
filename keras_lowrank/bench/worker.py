"""Worker process: measures one entry's peak memory and prints it as JSON.

Reads `{"block": ..., "entry": ..., "steps": n, "warmup": n}` on stdin and
prints one line `KERAS_LOWRANK_BENCH_RESULT {json}`. Run by the benchmark
itself, one fresh process per entry, so every peak is the entry's own.
"""

import json
import sys


def main():
    request = json.loads(sys.stdin.read())
    from keras_lowrank.bench import runner

    result = runner.memory_entry(
        request["block"], request["entry"], request["steps"], request["warmup"]
    )
    sys.stdout.write("KERAS_LOWRANK_BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
