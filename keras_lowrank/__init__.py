"""keras_lowrank: low-rank adapters (LoRA and its family) for Keras 3."""

from keras_lowrank.layers import LowRankConv1D
from keras_lowrank.layers import LowRankConv2D
from keras_lowrank.layers import LowRankConv3D
from keras_lowrank.layers import LowRankDense
from keras_lowrank.layers import LowRankEinsumDense
from keras_lowrank.layers import LowRankEmbedding
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.loraplus import LoraPlusOptimizer
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.version import __version__
