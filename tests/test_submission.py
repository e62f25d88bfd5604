"""The sample_submission CSV format: sample order kept, bad rows named, nothing written that would not validate."""

import numpy as np
import pandas as pd
import pytest

from kit.errors import KitError
from kit.submission import build_submission, write_submission


@pytest.fixture
def sample():
    return pd.DataFrame({"id": ["c3", "a1", "b2", "e5", "d4"], "label": 0})


def test_writer_keeps_sample_order_whatever_the_prediction_order(sample, tmp_path):
    ids = ["a1", "b2", "c3", "d4", "e5"]
    probabilities = [0.1, 0.2, 0.3, 0.4, 0.5]
    path = write_submission(build_submission(ids, probabilities, sample), tmp_path / "s.csv", sample,
                            {"experiment": "x", "cv_auc": 0.9, "folds": [0], "tta": "d4"})
    text = path.read_text().splitlines()
    assert text[0] == "id,label"
    written = pd.read_csv(path, dtype={"id": str})
    assert written["id"].tolist() == sample["id"].tolist()
    assert written.set_index("id")["label"].to_dict() == dict(zip(ids, probabilities))


@pytest.mark.parametrize("ids, probabilities, message", [
    (["a1", "b2", "c3", "d4"], [0.1] * 4, "4 rows but sample_submission.csv has 5; missing ids include e5"),
    (["a1", "b2", "c3", "d4", "e5", "zz"], [0.1] * 6, "row 7 has id zz, which is not in sample_submission.csv"),
    (["a1", "b2", "c3", "d4", "d4"], [0.1] * 5, "row 6 repeats id d4"),
    (["a1", "b2", None, "d4", "e5"], [0.1] * 5, "row 4 has id None, which is not in sample_submission.csv"),
    (["a1", "b2", "c3", "d4", "e5"], [0.1, np.nan, 0.1, 0.1, 0.1], "row 3 (id b2) has label nan"),
    (["a1", "b2", "c3", "d4", "e5"], [0.1, 0.1, 1.5, 0.1, 0.1], "row 4 (id c3) has label 1.5"),
    (["a1", "b2 ", "c3", "d4", "e5"], [0.1] * 5, "row 3 has id 'b2 ' with leading/trailing whitespace"),
])
def test_writer_refuses_missing_extra_duplicate_and_nan(sample, ids, probabilities, message):
    with pytest.raises(KitError) as caught:
        build_submission(ids, probabilities, sample)
    assert message in str(caught.value)
