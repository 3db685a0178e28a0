"""Worker process: measures one entry's peak memory and prints it as JSON.

Reads `{"workload": "compare" | "llm", "block": ..., "entry": ...,
"steps": n, "warmup": n}` on stdin and prints one line
`KERAS_LOWRANK_BENCH_RESULT {json}`. Run by the benchmark itself
(`measure.in_fresh_process`), one fresh process per entry, so every peak is the
entry's own.
"""

import json
import sys

from keras_lowrank.bench.measure import RESULT_TAG

def main():
    request = json.loads(sys.stdin.read())
    if request.get("workload") == "llm":
        from keras_lowrank.bench import llm as module
    else:
        from keras_lowrank.bench import runner as module
    result = module.memory_entry(
        request["block"], request["entry"], request["steps"], request["warmup"]
    )
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
