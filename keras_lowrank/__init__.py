"""keras_lowrank: low-rank adapters (LoRA and its family) for Keras 3.

See README.md for a quick start and docs/ for the guides.

Importing the package imports Keras and registers every layer class, so
`keras.saving.load_model` finds them. The `keras-lowrank` command starts
from `keras_lowrank_cli` (a module outside this package) for that reason:
its `--help` needs no backend.
"""

from keras_lowrank.io.adapter_files import load_adapter
from keras_lowrank.io.adapter_files import read_adapter_config
from keras_lowrank.io.adapter_files import save_adapter
from keras_lowrank.combine import Combination
from keras_lowrank.combine import combine
from keras_lowrank.integrations.peft import export_peft_adapter
from keras_lowrank.integrations.peft import load_peft_adapter
from keras_lowrank.layers import LowRankConv1D
from keras_lowrank.layers import LowRankConv2D
from keras_lowrank.layers import LowRankConv3D
from keras_lowrank.layers import LowRankDense
from keras_lowrank.layers import LowRankEinsumDense
from keras_lowrank.layers import LowRankEmbedding
from keras_lowrank.layers import LowRankReversibleEmbedding
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.lifecycle import delete_adapter
from keras_lowrank.lifecycle import disable_adapters
from keras_lowrank.lifecycle import merge
from keras_lowrank.lifecycle import set_adapter
from keras_lowrank.lifecycle import unmerge
from keras_lowrank.loraplus import LoraPlusOptimizer
from keras_lowrank.io.keras_file import load_model
from keras_lowrank.report import AdapterReport
from keras_lowrank.report import report
from keras_lowrank.serving import per_example_adapters
from keras_lowrank.serving import stack_adapters
from keras_lowrank.serving import unstack_adapters
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.surgery.adapt import adapt
from keras_lowrank.surgery.adapt import unload
from keras_lowrank.version import __version__
from keras_lowrank import analysis
from keras_lowrank.analysis.extraction import extract

__all__ = [
    "__version__",
    "adapt",
    "analysis",
    "AdapterReport",
    "AdapterSpec",
    "Combination",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "export_peft_adapter",
    "extract",
    "load_adapter",
    "load_model",
    "load_peft_adapter",
    "LoraPlusOptimizer",
    "LowRankConv1D",
    "LowRankConv2D",
    "LowRankConv3D",
    "LowRankDense",
    "LowRankEinsumDense",
    "LowRankEmbedding",
    "LowRankLayer",
    "LowRankReversibleEmbedding",
    "merge",
    "per_example_adapters",
    "read_adapter_config",
    "report",
    "save_adapter",
    "set_adapter",
    "stack_adapters",
    "unload",
    "unmerge",
    "unstack_adapters",
]
