"""The rank-r factorisation of EinsumDense kernels, over a table of equations.

The table holds every EinsumDense equation used by KerasHub's attention and
MLP layers (and Keras's MultiHeadAttention), plus equations with batch axes of
the factorisation and with `...`. For each one the two-step adapter path
`einsum(einsum(x, A), B)` must equal `einsum(x, ΔW)` with the explicit
`ΔW = einsum(delta_equation, A, B)`, and `ΔW` must have rank r between the
kernel's input and output sides.
"""

import copy
import string

import keras
import numpy as np
import pytest
from keras import ops

from keras_lowrank import LowRankEinsumDense
from keras_lowrank.layers.einsum_factorization import factorize

# (equation, batch letters, input letters, output letters), as expected.
EQUATIONS = [
    # Keras MultiHeadAttention (BERT, RoBERTa, DistilBERT, ... in KerasHub).
    ("abc,cde->abde", "", "c", "de"),  # query/key/value
    ("abcd,cde->abe", "", "cd", "e"),  # attention output
    ("abcd,def->abcef", "", "d", "ef"),  # MHA over 2-D positions
    ("abc,cd->abd", "", "c", "d"),
    ("abc,cdef->abdef", "", "c", "def"),
    # Gemma / Gemma 3.
    ("btd,ndh->btnh", "", "d", "nh"),
    ("btnh,nhd->btd", "", "nh", "d"),
    ("btd,df->btf", "", "d", "f"),  # MLP gate/up
    ("btf,fd->btd", "", "f", "d"),  # MLP down
    ("bSm,kmh->bSkh", "", "m", "kh"),
    # Llama / Mistral / Qwen / Phi-3 / Falcon / ...
    ("bqm,muh->bquh", "", "m", "uh"),
    ("bkm,mvh->bkvh", "", "m", "vh"),
    ("bquh,uhm->bqm", "", "uh", "m"),
    ("bkm,mnh->bknh", "", "m", "nh"),
    ("bqm,mnh->bqnh", "", "m", "nh"),
    ("btd,dnh->btnh", "", "d", "nh"),
    ("btm,mnh->btnh", "", "m", "nh"),
    ("bsm,mnh->bsnh", "", "m", "nh"),
    ("bsd,dkh->bskh", "", "d", "kh"),
    ("bsd,kdh->bskh", "", "d", "kh"),
    ("bsd,qdh->bsqh", "", "d", "qh"),
    # XLNet relative attention output.
    ("ibnd,hnd->ibh", "", "nd", "h"),
    # Batch axes of the factorisation: one rank-r update per entry.
    ("bnd,ndh->bnh", "n", "d", "h"),
    ("ebd,edf->ebf", "e", "d", "f"),  # mixture-of-experts style
    ("btnh,nhd->btnd", "n", "h", "d"),
    ("bgnd,gdk->bgnk", "g", "d", "k"),
    # Ellipsis, left and right.
    ("...b,bc->...c", "", "b", "c"),
    ("...ab,bc->...ac", "", "b", "c"),
    ("ab...,bc->ac...", "", "b", "c"),
    ("...d,dnh->...nh", "", "d", "nh"),
    # An input axis summed over without meeting the kernel.
    ("abc,cd->ad", "", "c", "d"),
]

IDS = [eq for eq, *_ in EQUATIONS]
RANK = 2
# Every letter gets a size from 3 to 6, so r=2 < min(d, k) everywhere.
SIZES = {c: 3 + i % 4 for i, c in enumerate(string.ascii_letters)}
ELLIPSIS = (2, 3)


def _shape(spec):
    head, dots, tail = spec.partition("...")
    return (
        tuple(SIZES[c] for c in head)
        + (ELLIPSIS if dots else ())
        + tuple(SIZES[c] for c in tail)
    )


def _factors(rng, batch, ins, outs, rank=RANK):
    a = rng.standard_normal(_shape(batch + ins) + (rank,))
    b = rng.standard_normal(_shape(batch) + (rank,) + _shape(outs))
    return a, b


def _split(equation):
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    return inputs, kernel, output


@pytest.mark.parametrize("equation, batch, ins, outs", EQUATIONS, ids=IDS)
def test_axes_and_factor_shapes(equation, batch, ins, outs):
    f = factorize(equation)
    _, kernel, _ = _split(equation)
    letters = lambda axes: "".join(kernel[i] for i in axes)  # noqa: E731
    assert letters(f.batch_axes) == batch
    assert letters(f.in_axes) == ins
    assert letters(f.out_axes) == outs
    layout = f.layout(_shape(kernel))
    assert layout.a_shape(RANK) == _shape(batch + ins) + (RANK,)
    assert layout.b_shape(RANK) == _shape(batch) + (RANK,) + _shape(outs)
    # The factor equations name the factors in exactly those layouts.
    a_spec = f.a_equation.split(",")[1].split("->")[0]
    b_spec = f.b_equation.split(",")[1].split("->")[0]
    rank_letter = a_spec[-1]
    assert rank_letter not in equation
    assert a_spec == batch + ins + rank_letter
    assert b_spec == batch + rank_letter + outs
    assert f.delta_equation == f"{a_spec},{b_spec}->{kernel}"


@pytest.mark.parametrize("equation, batch, ins, outs", EQUATIONS, ids=IDS)
def test_two_step_equals_explicit_delta(equation, batch, ins, outs):
    rng = np.random.default_rng(abs(hash(equation)) % 2**32)
    f = factorize(equation)
    inputs, kernel, _ = _split(equation)
    x = rng.standard_normal(_shape(inputs))
    a, b = _factors(rng, batch, ins, outs)
    delta = np.einsum(f.delta_equation, a, b)
    assert delta.shape == _shape(kernel)
    # ΔW from the expected letters, independently of the code under test.
    reference = np.einsum(f"{batch}{ins}z,{batch}z{outs}->{kernel}", a, b)
    np.testing.assert_allclose(delta, reference, rtol=1e-12)
    explicit = np.einsum(equation, x, delta)
    two_step = np.einsum(f.b_equation, np.einsum(f.a_equation, x, a), b)
    np.testing.assert_allclose(two_step, explicit, rtol=1e-10, atol=1e-10)
    # The same on the active backend, in float32.
    x32, a32, b32 = (v.astype("float32") for v in (x, a, b))
    backend = ops.einsum(f.b_equation, ops.einsum(f.a_equation, x32, a32), b32)
    np.testing.assert_allclose(
        ops.convert_to_numpy(backend), explicit, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("equation, batch, ins, outs", EQUATIONS, ids=IDS)
def test_delta_has_rank_r(equation, batch, ins, outs):
    rng = np.random.default_rng(0)
    f = factorize(equation)
    _, kernel, _ = _split(equation)
    a, b = _factors(rng, batch, ins, outs)
    delta = np.einsum(f.delta_equation, a, b)
    layout = f.layout(delta.shape)
    matrix = np.transpose(delta, layout.perm).reshape(
        layout.batch_shape + (layout.d, layout.k)
    )
    ranks = np.linalg.matrix_rank(matrix.reshape((-1, layout.d, layout.k)))
    assert (ranks == RANK).all()
    assert RANK < layout.max_rank
    # And the layout's own matrix view agrees with the manual one.
    np.testing.assert_allclose(
        ops.convert_to_numpy(layout.to_matrix(delta.astype("float32"))),
        matrix,
        rtol=1e-6,
    )


def test_bert_query_parameter_counts():
    """(384 → 12 heads × 32) at r=4: 3,072 adapter parameters here, 18,560
    with Keras's built-in `enable_lora`."""

    def make():
        layer = keras.layers.EinsumDense(
            "abc,cde->abde", output_shape=(None, 12, 32), bias_axes="de"
        )
        layer.build((None, 128, 384))
        return layer

    keras_layer = make()
    ours = copy.deepcopy(keras_layer)
    keras_layer.enable_lora(4)
    keras_count = sum(
        int(np.prod(v.shape))
        for v in (keras_layer.lora_kernel_a, keras_layer.lora_kernel_b)
    )
    assert keras_count == 18_560
    LowRankEinsumDense.from_layer(ours, rank=4)
    variables = ours.adapter_variables("default")
    assert tuple(variables["A"].shape) == (384, 4)
    assert tuple(variables["B"].shape) == (4, 12, 32)
    ours_count = sum(int(np.prod(v.shape)) for v in variables.values())
    assert ours_count == 4 * (384 + 12 * 32) == 3_072
    assert [w.name for w in ours.trainable_weights] == [
        "lowrank_A_default",
        "lowrank_B_default",
    ]


def test_rank_letter_avoids_used_letters():
    f = factorize("rqs,srt->rqt")  # 'r' is taken.
    assert f.a_equation == "rqs,rsa->rqa"
    assert f.b_equation == "rqa,rat->rqt"
    assert f.delta_equation == "rsa,rat->srt"
    assert f.batch_axes == (1,)


def test_spaces_are_ignored():
    assert factorize("btd, df -> btf").a_equation == "btd,dr->btr"


BAD_EQUATIONS = [
    ("abc", "cannot read the einsum equation 'abc'.*'abc,cd->abd'"),
    ("ab,bc", "cannot read the einsum equation 'ab,bc'"),
    ("ab,bc,cd->ad", "cannot read the einsum equation"),
    ("ab,...b->a...", r"kernel spec of 'ab,\.\.\.b->a\.\.\.' has '\.\.\.'"),
    ("ab,bcd->ad", "kernel axis 'c' of 'ab,bcd->ad' is summed within the kernel"),
    ("ab,b->a", "'ab,b->a' has no output kernel axis"),
    ("ab,ac->abc", "'ab,ac->abc' has no contracted kernel axis"),
    ("ab,bb->ab", "kernel axis 'b' appears twice in 'ab,bb->ab'"),
]


@pytest.mark.parametrize(
    "equation, message", BAD_EQUATIONS, ids=[e for e, _ in BAD_EQUATIONS]
)
def test_bad_equations(equation, message):
    with pytest.raises(ValueError, match=message) as info:
        factorize(equation, path="encoder/attention/query")
    text = str(info.value)
    assert text.startswith("keras_lowrank: layer 'encoder/attention/query': ")
    assert "Exclude this layer" in text


def test_bad_equation_without_path():
    with pytest.raises(ValueError, match=r"^keras_lowrank: the equation"):
        factorize("ab,b->a")
