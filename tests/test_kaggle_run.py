"""`make kaggle-run` with the real kaggle client against the loopback fake Kaggle (tests/fake_kaggle.py): the bundle
uploaded as a private dataset, the kernel pushed (private, GPU, internet off, the config injected), its status
followed, its outputs downloaded, the CSV submitted; a rerun follows the same kernel; failures in one line."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from kit.competition import COMPETITION
from kit.config import load_config, to_dict
from kit.errors import KitError
from kit.kaggle_run import kaggle_run, state_path

USER = "kit-tester"


def competition_sample() -> pd.DataFrame:
    """57,458 ids of 40 hexadecimal digits, as the competition's sample_submission.csv has."""
    ids = [f"{number:040x}" for number in range(57_458)]
    return pd.DataFrame({"id": ids, "label": 0})


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


@pytest.fixture
def experiment(tmp_path):
    return load_config(REPO / "configs" / "demo.yaml", {"out_dir": str(tmp_path / "runs"),
                                                         "submissions_dir": str(tmp_path / "submissions"),
                                                         "epochs": 3})


@pytest.fixture
def finished_kernel(fake_kaggle):
    """The fake's kernel queues, runs and completes, leaving what the notebook leaves in /kaggle/working."""
    sample = competition_sample()
    prediction = sample.assign(label=np.linspace(0, 1, len(sample)))
    fake_kaggle.kernel_statuses = [("QUEUED", ""), ("RUNNING", ""), ("COMPLETE", "")]
    fake_kaggle.dataset_statuses = ["BLOBS_RECEIVED", "READY"]   # Kaggle processes a new version before it is usable
    fake_kaggle.kernel_outputs = {
        "submission.csv": csv_bytes(prediction), "sample_submission.csv": csv_bytes(sample),
        "submissions/demo-20261128-101010.json": json.dumps(
            {"experiment": "demo", "cv_auc": 0.9876, "folds": [0, 1, 2], "tta": "d4"}).encode(),
        "runs/demo/fold0/best.pt": b"weights", "runs/demo/fold0/metrics.json": b'{"oof_auc": 0.98}'}
    return fake_kaggle


def test_kaggle_run_pushes_follows_downloads_and_submits(finished_kernel, experiment, tmp_path):
    lines = []
    csv = kaggle_run(experiment, submit=True, poll_seconds=0, log=lines.append)

    # the kit bundle as a private dataset, with the wheel the notebook installs offline
    (version,) = finished_kernel.datasets[f"{USER}/hcd-kit"]
    assert version["private"] is True
    with zipfile.ZipFile(io.BytesIO(version["files"]["hcd-kit.zip"])) as bundle:
        assert {"kit/api.py", "notebooks/kaggle.ipynb", "wheels/ttach-0.0.3-py3-none-any.whl"} <= set(bundle.namelist())

    # the kernel: private, GPU on a T4, internet off, the competition and the kit attached, the config injected
    (pushed,) = finished_kernel.kernels[f"{USER}/hcd-kit-demo"]
    assert pushed["isPrivate"] is True and pushed["enableGpu"] is True and pushed["enableInternet"] is False
    assert pushed["machineShape"] == "NvidiaTeslaT4" and pushed["kernelType"] == "notebook"
    assert pushed["datasetDataSources"] == [f"{USER}/hcd-kit"] and pushed["competitionDataSources"] == [COMPETITION]
    notebook = json.loads(pushed["text"])
    parameters = "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])
    namespace = {}
    exec(parameters, namespace)
    assert namespace["OVERRIDES"]["epochs"] == 3 and namespace["OVERRIDES"]["name"] == "demo"
    assert "data_dir" not in namespace["OVERRIDES"] and namespace["SUBMIT"] is False
    on_kaggle = load_config(namespace["CONFIG"], namespace["OVERRIDES"])       # what the notebook will train
    paths = ("data_dir", "out_dir", "cache_dir", "submissions_dir")
    assert {k: v for k, v in to_dict(on_kaggle).items() if k not in paths} == \
        {k: v for k, v in to_dict(experiment).items() if k not in paths}

    # the kernel was pushed once the new bundle was ready
    methods = [method for method, _ in finished_kernel.calls]
    created = methods.index("CreateDataset")
    assert methods[created + 1:methods.index("SaveKernel")] == ["GetDatasetStatus", "GetDatasetStatus"]
    assert f"dataset {USER}/hcd-kit: blobs_received …" in lines

    # followed to the end, one line per status
    assert [line.split(": ")[1].split(" ")[0] for line in lines if line.startswith(f"{USER}/hcd-kit-demo: ")] == \
        ["queued", "running", "complete"]

    # the outputs where `make predict` and `make train` would have put them
    assert csv.parent == tmp_path / "submissions" and csv.name.startswith("demo-kaggle-")
    assert pd.read_csv(csv, dtype={"id": str})["label"].iloc[-1] == 1.0
    assert (tmp_path / "runs" / "demo" / "fold0" / "best.pt").read_bytes() == b"weights"
    assert json.loads(state_path(experiment).read_text())["downloaded"] is True

    # and submitted as `make submit` does, with the kernel's CV AUC in the message
    (submission,) = finished_kernel.submissions
    assert submission["submissionDescription"] == "demo | CV AUC 0.9876 | folds [0, 1, 2] | TTA d4"
    assert finished_kernel.uploads[submission["blobFileTokens"]] == csv.read_bytes()


def test_a_rerun_follows_the_kernel_already_pushed(finished_kernel, experiment):
    kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)
    lines = []
    kaggle_run(experiment, poll_seconds=0, log=lines.append)
    assert len(finished_kernel.kernels[f"{USER}/hcd-kit-demo"]) == 1, "no second push"
    assert len(finished_kernel.datasets[f"{USER}/hcd-kit"]) == 1
    assert lines[0].startswith("following the kernel pushed at")
    kaggle_run(experiment, force=True, poll_seconds=0, log=lambda *_: None)
    assert len(finished_kernel.kernels[f"{USER}/hcd-kit-demo"]) == 2
    assert len(finished_kernel.datasets[f"{USER}/hcd-kit"]) == 2, "the bundle is versioned, not created again"


def test_a_failed_kernel_is_one_line_with_the_end_of_its_log(fake_kaggle, experiment):
    fake_kaggle.kernel_statuses = [("RUNNING", ""), ("ERROR", "Your notebook hit an unhandled error")]
    fake_kaggle.kernel_log = json.dumps([{"stream_name": "stderr", "time": 1.0, "data": "Traceback ...\n"},
                                         {"stream_name": "stderr", "time": 2.0,
                                          "data": "KitError: fold 0 of `demo` was trained with another config\n"}])
    with pytest.raises(KitError) as caught:
        kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)
    message = str(caught.value)
    assert "ended with error (Your notebook hit an unhandled error)" in message
    assert message.endswith("Traceback ... | KitError: fold 0 of `demo` was trained with another config; fix it "
                            "and run `make kaggle-run` again with FORCE=1")


def test_rules_not_accepted_is_one_line(fake_kaggle, experiment):
    fake_kaggle.fail_methods["SaveKernel"] = 403
    with pytest.raises(KitError, match=r"HTTP 403\): accept the competition rules at https://www.kaggle.com/"):
        kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)
    assert not state_path(experiment).exists(), "nothing recorded: a rerun pushes again"


def test_missing_credentials_and_a_p100_are_refused_before_anything_is_sent(no_kaggle_credentials, experiment):
    with pytest.raises(KitError, match="no Kaggle credentials found"):
        kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)
    with pytest.raises(KitError, match="no kernels for the P100; pick a T4"):
        kaggle_run(experiment, accelerator="NvidiaTeslaP100", poll_seconds=0, log=lambda *_: None)
