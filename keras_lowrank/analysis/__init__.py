"""Measuring the low-rank hypothesis on your own model, and acting on it.

- `delta_spectrum(base, tuned)`: singular values of each layer's update.
- `extract(base, tuned, rank=|energy=)`: a full fine-tune as a LoRA adapter.
- `GradientSubspace`: a callback logging how much of each weight gradient
  lies in a rank-r subspace (and in an adapter's factor span).
- `load_model_or_preset(path)`: a `.keras` file or a KerasHub preset folder.

See docs/low_rank.md for the math and the workflows.
"""

from keras_lowrank.analysis.extraction import Extraction
from keras_lowrank.analysis.extraction import ExtractedLayer
from keras_lowrank.analysis.extraction import extract
from keras_lowrank.analysis.gradients import GradientSubspace
from keras_lowrank.analysis.loading import load_model_or_preset
from keras_lowrank.analysis.spectrum import DeltaSpectrum
from keras_lowrank.analysis.spectrum import LayerSpectrum
from keras_lowrank.analysis.spectrum import delta_spectrum

__all__ = [
    "DeltaSpectrum",
    "ExtractedLayer",
    "GradientSubspace",
    "Extraction",
    "LayerSpectrum",
    "delta_spectrum",
    "extract",
    "load_model_or_preset",
]
