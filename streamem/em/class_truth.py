"""Classification accuracy against a simulation's ground truth (pure functions).

A classification's classes have no names, so a found class is credited to the true
class that makes up most of it (its majority). A particle is counted correct when its
true class is its found class's majority; the junk of a simulation (true class 0) is
scored the same way, so junk must end in classes where junk is the majority.
Reading the truth from a store is :func:`streamem.em.runfiles.true_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ClassAccuracy:
    """How found classes match the true ones.

    composition: (K, T) particle counts, found class k (from 1) × true label
    ``truth_labels[t]`` (0 = junk). majority: (K,) true label of each found class's
    majority (−1 for an empty class). accuracy: share of all particles whose true class
    is their class's majority. per_truth: {true label: share of its particles that are
    in classes it dominates}.
    """

    composition: np.ndarray
    truth_labels: np.ndarray
    majority: np.ndarray
    accuracy: float
    per_truth: dict

    def table(self) -> pd.DataFrame:
        """One row per found class: rlnClassNumber, counts per true class, majority."""
        df = pd.DataFrame(
            self.composition,
            columns=[f"true_class_{int(t)}" for t in self.truth_labels],
        )
        df.insert(0, "rlnClassNumber", np.arange(1, len(df) + 1))
        df["majority_true_class"] = self.majority
        return df

    def summary(self) -> str:
        """One line: overall accuracy and the share of each true class (0 = junk)."""
        parts = " ".join(f"{int(t)}:{100 * s:.1f}%" for t, s in self.per_truth.items())
        return f"accuracy vs truth {100 * self.accuracy:.1f}% (per true class {parts})"


def class_accuracy(true_classes, found_classes, n_classes: int) -> ClassAccuracy:
    """Score found classes (n,) int from 1 against true classes (n,) int (0 = junk)."""
    true_classes = np.asarray(true_classes, np.int64)
    found_classes = np.asarray(found_classes, np.int64)
    if true_classes.shape != found_classes.shape:
        raise ValueError(f"{true_classes.shape} true vs {found_classes.shape} found classes")
    labels, true_index = np.unique(true_classes, return_inverse=True)
    composition = np.zeros((n_classes, labels.size), np.int64)
    np.add.at(composition, (found_classes - 1, true_index.ravel()), 1)
    filled = composition.sum(axis=1) > 0
    majority = np.where(filled, labels[composition.argmax(axis=1)], -1)
    correct = majority[found_classes - 1] == true_classes
    per_truth = {int(t): float(np.mean(correct[true_classes == t])) for t in labels}
    return ClassAccuracy(
        composition=composition,
        truth_labels=labels,
        majority=majority,
        accuracy=float(np.mean(correct)) if correct.size else 0.0,
        per_truth=per_truth,
    )
