"""`LowRankReversibleEmbedding`: a `keras.layers.ReversibleEmbedding` (KerasHub's
token embedding, whose table also gives the logits) with low-rank adapters.

KerasHub's `keras_hub.layers.ReversibleEmbedding` is an alias of Keras's (a
subclass that adds nothing, see `convert.plain_class`), so both are adapted.
"""

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank.layers.embedding import LowRankEmbedding
from keras_lowrank.spec import where


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankReversibleEmbedding(
    LowRankEmbedding, keras.layers.ReversibleEmbedding
):
    """A ReversibleEmbedding whose table `E` gets `s·A·B` on both sides.

    The lookup is `LowRankEmbedding`'s: `E[ids] + s·A[ids]·B`. With tied
    weights (`tie_weights=True`, as in SmolLM2, Llama 3.2 and Gemma) the
    logits see the same update, `h·(E + s·A·B)ᵀ = h·Eᵀ + s·(h·Bᵀ)·Aᵀ`,
    before the soft cap, and still no vocab×dim matrix is formed. So a
    token-rows adapter (`AdapterSpec.for_tokens`) changes a token's input
    row and its output column alike, as PEFT does for tied embeddings.
    With untied weights the separate output table stays as it is.

    DoRA is refused on a tied table (its norm would rescale the logits'
    inputs too) and so are quantized tables (the logits' quantized
    product is Keras's own): adapt the float model.

    Args:
        input_dim: vocabulary size.
        output_dim: embedding size.
        adapter: the adapter's options as one `AdapterSpec` (or the
            keywords, as for `LowRankEmbedding`).
        **kwargs: every other `keras.layers.ReversibleEmbedding`
            argument (`tie_weights`, `logit_soft_cap`, ...) and the saved
            adapter state.

    Example:

    >>> import numpy as np
    >>> from keras_lowrank import AdapterSpec
    >>> layer = LowRankReversibleEmbedding(
    ...     100, 16, adapter=AdapterSpec.for_tokens([7]))
    >>> tuple(layer(np.array([[1, 7]])).shape)
    (1, 2, 16)
    >>> tuple(layer(np.ones((1, 2, 16), "float32"), reverse=True).shape)
    (1, 2, 100)
    """

    base_class = keras.layers.ReversibleEmbedding

    @classmethod
    def check_spec(cls, spec, path):
        super().check_spec(spec, path)
        if spec.method == "dora":
            raise ValueError(
                f"{where(path)}: DoRA on a ReversibleEmbedding is not "
                "supported: its norm would rescale the logits too. Use "
                "method='lora' for this layer, or exclude it."
            )

    @staticmethod
    def refuse_quantized(path, mode):
        """The one refusal of a quantized table, before adapting and
        before `quantize` (see `quantized.check_quantizable`)."""
        raise ValueError(
            f"{where(path)}: a ReversibleEmbedding quantized ({mode!r}) "
            "cannot hold adapters: its logits are Keras's own quantized "
            "product, which an adapter cannot join. Keep this table in "
            "float (adapt the float model; model.quantize(..., "
            "filters=...) without it), or leave it out of the adapter."
        )

    @classmethod
    def _check_geometry(cls, layer, path):
        if layer.quantization_mode is not None:
            cls.refuse_quantized(path, layer.quantization_mode)

    def _logit_factors(self):
        """`(A, B, scale)` of each update the logits add: the live
        adapters, or the stacked slot while serving (whose scale is in
        `B`; mixed-row batches do not cover embeddings)."""
        aset = self._lowrank
        if aset.stack is not None:
            return [(*aset.stack.routed(), 1.0)]
        return [
            (aset.variables(n)["A"], aset.variables(n)["B"],
             aset.specs[n].scale)
            for n in aset.live()
        ]

    def _frozen_base_variables(self):
        extra = getattr(self, "reverse_embeddings", None)
        return super()._frozen_base_variables() + (
            [extra] if extra is not None else []
        )

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            return super().call(inputs, training=training)
        return self._logits(inputs)

    def _logits(self, inputs):
        kernel = (
            ops.transpose(self.embeddings)
            if self.tie_weights
            else self.reverse_embeddings
        )
        dtype = self.reverse_dtype or inputs.dtype
        inputs = ops.cast(inputs, dtype)
        logits = ops.matmul(inputs, ops.cast(kernel, dtype))
        if self.tie_weights:
            for a, b, scale in self._logit_factors():
                # ΔEᵀ = Bᵀ·Aᵀ: the logits' share, in low rank.
                logits = ops.add(logits, adapter_math.lowrank_contribution(
                    inputs, ops.transpose(b), ops.transpose(a), scale,
                    dtype=dtype,
                ))
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits
