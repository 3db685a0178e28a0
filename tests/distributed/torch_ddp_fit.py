"""Adapters trained with PyTorch's DistributedDataParallel (Keras torch
backend), 2 CPU processes over gloo.

    KERAS_BACKEND=torch python tests/distributed/torch_ddp_fit.py

Keras's own `fit` does not drive DDP; as in Keras's guide "Multi-GPU
distributed training with PyTorch", the adapted Keras model (a
`torch.nn.Module` on this backend) is wrapped in `DDP` and trained by a plain
PyTorch loop over the parameters that require gradients: exactly the active
adapters' factors. The same loop on one process, over the whole batch, is
the reference. Prints one JSON object with the largest difference.
"""

import json
import os
import socket
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np  # noqa: E402

STEPS = 3


def build():
    import keras

    import keras_lowrank

    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="wide")(inputs)
    h = keras.layers.EinsumDense(
        "ab,bcd->acd", (4, 8), bias_axes="cd", name="heads"
    )(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4, name="head")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))
    keras_lowrank.adapt(model, rank=4, targets=["wide", "heads"])
    for layer in keras_lowrank.state.model_state.adapted_layers(model):
        for var in layer.adapter_variables("default").values():
            var.assign(0.2 * rng.normal(size=var.shape).astype("float32"))
    return model


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 16)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    return x, y


def train(module, model, x, y):
    """A plain PyTorch loop; `module` is the model or its DDP wrapper."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), y)
        loss.backward()
        optimizer.step()
    return {
        w.path: w.value.detach().cpu().numpy().copy()
        for w in model.trainable_weights
    }, len(params)


def worker(rank, world_size, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        model = build()
        ddp = DistributedDataParallel(model)
        x, y = data()
        shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        factors, _ = train(ddp, model, x[shard], y[shard])
        if rank == 0:
            np.savez(out, **{k.replace("/", "|"): v for k, v in factors.items()})
    finally:
        dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp

    model = build()
    before = {w.path: w.numpy().copy() for w in model.trainable_weights}
    reference, n_params = train(model, model, *data())
    moved = max(float(np.abs(reference[k] - before[k]).max()) for k in before)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "factors.npz")
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    ddp = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    gap = max(float(np.abs(ddp[k] - reference[k]).max()) for k in reference)
    print(
        "RESULT "
        + json.dumps(
            {
                "world_size": 2,
                "trainable": sorted(reference),
                "parameters_with_grad": n_params,
                "moved": moved,
                "ddp_gap": gap,
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
