"""Benchmark: what `keras.RematScope` saves when training adapters.

    python scripts/bench_remat.py [--backends jax torch] [--seq 2048] [--quick]

A long-sequence workload: a stack of pre-norm transformer blocks (Keras's
`MultiHeadAttention` + an MLP; sequence 2048 by default), whose attention
query/value projections and MLP layers are adapted at rank 8. The same
model is built

- without rematerialisation;
- inside `RematScope(mode="list_of_layers", layer_names=[blocks])`: each
  block is recomputed as a whole in the backward pass (what large-model
  training usually does);
- inside `RematScope(mode="full")`: every layer is recomputed;
- inside `RematScope(mode="activations")`: only activation functions.

Each (backend, mode) runs in a fresh process and reports the memory that
rematerialisation is about: the activations the forward pass keeps for the
backward pass (weights excluded). On JAX these are the residuals of the
training loss's VJP (`saved_residuals`, what `jax.ad_checkpoint.
print_saved_residuals` prints); on torch, the tensors autograd saves
(`torch.autograd.graph.saved_tensors_hooks`). Peak training memory is that
plus the weights, optimizer state and one layer's temporaries. It also
reports the median step time (`train_on_batch`).

(Why not XLA's `memory_analysis()`: XLA:CPU sizes its temporary buffer the
same with and without `jax.checkpoint`, even for plain JAX code; on GPU/TPU
XLA schedules for memory and the saved activations are what shrinks.)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402

MODES = (None, "blocks", "full", "activations")


@keras.saving.register_keras_serializable(package="bench_remat")
class Block(keras.layers.Layer):
    """Pre-norm transformer block. `call` takes no `training` argument, so
    its sublayers read `training` from Keras's call context as a Python
    bool, also when the block is rematerialised as a whole."""

    def __init__(self, dim, heads, hidden, **kwargs):
        super().__init__(**kwargs)
        self.norm_1 = keras.layers.LayerNormalization(name="norm_1")
        self.attention = keras.layers.MultiHeadAttention(
            heads, dim // heads, name="attention"
        )
        self.norm_2 = keras.layers.LayerNormalization(name="norm_2")
        self.up = keras.layers.Dense(hidden, activation="gelu", name="up")
        self.down = keras.layers.Dense(dim, name="down")

    def call(self, x):
        h = self.norm_1(x)
        x = x + self.attention(h, h)
        return x + self.down(self.up(self.norm_2(x)))


def build(seq, dim=128, heads=4, hidden=512, blocks=4, remat=None, seed=0):
    keras.utils.set_random_seed(seed)

    def make():
        return [Block(dim, heads, hidden, name=f"block_{i}")
                for i in range(blocks)]

    if remat is None:
        layers = make()
    elif remat == "blocks":
        names = [f"block_{i}" for i in range(blocks)]
        with keras.RematScope(mode="list_of_layers", layer_names=names):
            layers = make()
    else:
        with keras.RematScope(mode=remat):
            layers = make()
    inputs = keras.Input((seq, dim))
    h = inputs
    for layer in layers:
        h = layer(h)
    outputs = keras.layers.Dense(dim, name="head")(h)
    model = keras.Model(inputs, outputs)
    keras_lowrank.adapt(
        model, rank=8, targets=["query", "value", "up", "down"]
    )
    return model


def measure(remat, seq=2048, batch=2, steps=2, **shape):
    """Runs in the child process: one row for this backend and `remat`."""
    model = build(seq, remat=remat, **shape)
    dim = model.input_shape[-1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, seq, dim)).astype("float32")
    y = rng.normal(size=(batch, seq, dim)).astype("float32")
    backend = keras.backend.backend()
    saved = {"jax": _jax_saved_bytes, "torch": _torch_saved_bytes}[backend]
    row = {
        "remat": remat or "none",
        "backend": backend,
        "saved_bytes": saved(model, x, y),
    }
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    row["step_ms"] = 1000 * statistics.median(times)
    return row


def _jax_saved_bytes(model, x, y):
    """Bytes of the residuals JAX keeps for the backward pass of the loss
    with respect to the trainable variables (arguments excluded)."""
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals

    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x, y):
        out, _ = model.stateless_call(trainable, non_trainable, x,
                                      training=True)
        return jnp.mean(jnp.square(out - y))

    trainable = [v.value for v in model.trainable_variables]
    residuals = saved_residuals(loss, trainable, x, y)
    return sum(
        int(np.prod(aval.shape)) * aval.dtype.itemsize
        for aval, where in residuals
        if not where.startswith("from the argument")
        and "constant" not in where
    )


def _torch_saved_bytes(model, x, y):
    """Bytes of the tensors autograd saves for the backward pass (each
    storage once; parameters excluded)."""
    import torch

    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0),
                             tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.from_numpy(x), training=True)
        loss = torch.mean(torch.square(out - torch.from_numpy(y)))
    loss.backward()
    return sum(saved.values())


def run_child(script, backend, args):
    """Runs `script --child ...args` in a fresh process on `backend` and
    returns the JSON it printed after "ROW " (the benchmark scripts measure
    each row in its own process)."""
    command = [sys.executable, os.path.abspath(script), "--child", *args]
    env = dict(os.environ, KERAS_BACKEND=backend)
    out = subprocess.run(command, env=env, capture_output=True, text=True,
                         check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("ROW ")][-1]
    return json.loads(line[4:])


def run(backend, remat, seq, batch, quick):
    """One row, measured in a fresh process on `backend`."""
    args = [remat or "none", "--seq", str(seq), "--batch", str(batch)]
    if quick:
        args.append("--quick")
    return run_child(__file__, backend, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="2 blocks (a smoke run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = {"blocks": 2} if args.quick else {}
    if args.child:
        remat = None if args.child == "none" else args.child
        row = measure(remat, seq=args.seq, batch=args.batch, **shape)
        print("ROW " + json.dumps(row), flush=True)
        return
    print(f"sequence {args.seq}, batch {args.batch}")
    print()
    print("| backend | RematScope | activations kept for backward |"
          " step time |")
    print("| --- | --- | ---: | ---: |")
    for backend in args.backends:
        for remat in MODES:
            row = run(backend, remat, args.seq, args.batch, args.quick)
            print(
                f"| {backend} | {row['remat']}"
                f" | {row['saved_bytes'] / 2**20:.1f} MiB"
                f" | {row['step_ms']:.0f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
