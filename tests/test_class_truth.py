"""Classification accuracy against the truth: majority matching, junk, empty classes."""

import numpy as np
import pytest

from streamem.em.class_truth import class_accuracy


def test_perfect_split_with_renamed_classes_is_fully_correct():
    truth = np.array([1, 1, 1, 2, 2, 0, 0])
    found = np.array([3, 3, 3, 1, 1, 2, 2])  # classes have no names: any permutation
    acc = class_accuracy(truth, found, 4)
    assert acc.accuracy == 1.0
    assert acc.per_truth == {0: 1.0, 1: 1.0, 2: 1.0}
    np.testing.assert_array_equal(acc.majority, [2, 0, 1, -1])  # class 4 is empty


def test_minority_members_count_as_wrong():
    truth = np.array([1, 1, 1, 2, 2, 2, 2, 2])
    found = np.array([1, 1, 2, 2, 2, 2, 2, 2])  # one particle of truth 1 is with the 2s
    acc = class_accuracy(truth, found, 2)
    assert acc.accuracy == pytest.approx(7 / 8)
    assert acc.per_truth[1] == pytest.approx(2 / 3) and acc.per_truth[2] == 1.0
    table = acc.table()
    assert list(table["rlnClassNumber"]) == [1, 2]
    assert table.loc[1, "true_class_1"] == 1 and table.loc[1, "true_class_2"] == 5


def test_junk_spread_over_volume_classes_is_wrong():
    truth = np.array([1, 1, 1, 1, 0, 0])
    found = np.array([1, 1, 1, 1, 1, 1])  # junk not separated
    acc = class_accuracy(truth, found, 2)
    assert acc.per_truth[0] == 0.0 and acc.accuracy == pytest.approx(4 / 6)
    assert "0:0.0%" in acc.summary()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        class_accuracy(np.ones(3), np.ones(4), 2)


class _FakeStore:
    def __init__(self, classes):
        self.classes = np.asarray(classes)

    def has_fields(self, labels, group="metadata"):
        return group == "truth" and self.classes is not None

    def read_field(self, label, group="metadata"):
        return self.classes


def test_true_classes_only_when_there_is_something_to_score():
    from streamem.em.runfiles import true_classes

    np.testing.assert_array_equal(true_classes(_FakeStore([1, 2, 0])), [1, 2, 0])
    assert true_classes(_FakeStore([1, 1, 1])) is None  # one volume, no junk
