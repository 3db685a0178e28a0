"""PEFT adapter folders as the PEFT tests write and read them by hand
(`adapter_config.json` plus `adapter_model.safetensors`). Import after
`pytest.importorskip("safetensors.numpy")`."""

import json
import os

import numpy as np
from safetensors import numpy as safetensors_numpy


def write_folder(path, config, tensors):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    safetensors_numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(path, "adapter_model.safetensors"),
    )


def read_folder(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = safetensors_numpy.load_file(
        os.path.join(path, "adapter_model.safetensors")
    )
    return config, tensors
