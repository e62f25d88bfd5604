"""`make kaggle-run` with the real kaggle client against the loopback fake Kaggle (tests/fake_kaggle.py): the bundle
uploaded as a private dataset, the kernel pushed (private, GPU, internet off, the config injected), its status
followed, its outputs downloaded, the CSV submitted; a rerun follows the same kernel; failures in one line."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kit.competition import COMPETITION
from kit.config import load_config, to_dict
from kit.errors import KitError
from kit.kaggle_run import kaggle_run, state_path

from conftest import REPO

USER = "kit-tester"
# every kaggle-run writes the bundle: its wheels from a local folder, never the package index
pytestmark = pytest.mark.usefixtures("offline_bundle")


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
    assert json.loads(state_path(experiment).read_text())["submission"] == str(csv)

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


# ---- nothing lost, nothing mixed up ---------------------------------------------------------------------------------

def test_kernel_slugs_are_one_per_experiment_name():
    from kit.kaggle_run import kernel_slug

    slugs = {name: kernel_slug(name) for name in ("demo", "demo_a", "demo-a", "Demo-a", "x" * 100)}
    assert slugs["demo"] == "hcd-kit-demo" and slugs["demo-a"] == "hcd-kit-demo-a"
    assert len(set(slugs.values())) == len(slugs), slugs
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", s) and len(s) <= 50 for s in slugs.values()), slugs


def test_accelerators_are_checked_before_anything_is_sent(no_kaggle_credentials, experiment):
    from kit.kaggle_run import check_accelerator

    assert check_accelerator("nvidial4") == "NvidiaL4" and check_accelerator("NvidiaTeslaT4") == "NvidiaTeslaT4"
    for bogus, why in (("NvidiaT4", "not a Kaggle GPU"), ("TpuV5E8", "TPUs run no CUDA, which the kit trains on")):
        with pytest.raises(KitError, match=rf"ACCELERATOR={bogus}: {why}; pick one of NvidiaTeslaT4, "):
            kaggle_run(experiment, accelerator=bogus, poll_seconds=0, log=lambda *_: None)


def test_outputs_of_another_experiment_are_refused(finished_kernel, experiment):
    outputs = finished_kernel.kernel_outputs
    outputs["submissions/demo-20261128-101010.json"] = json.dumps({"experiment": "other"}).encode()
    with pytest.raises(KitError, match=r"holds the outputs of `other`, not of `demo`: nothing was downloaded"):
        kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)
    assert not list(Path(experiment.submissions_dir).glob("*.csv"))


def test_local_folds_are_never_overwritten_by_a_kernels(finished_kernel, experiment):
    local = Path(experiment.out_dir) / "demo" / "fold0"
    local.mkdir(parents=True)
    (local / "best.pt").write_bytes(b"trained here")
    finished_kernel.kernel_outputs["runs/demo/fold1/best.pt"] = b"kernel fold 1"
    lines = []
    kaggle_run(experiment, poll_seconds=0, log=lines.append)
    assert (local / "best.pt").read_bytes() == b"trained here"
    elsewhere = Path(experiment.out_dir) / "demo-kaggle-v1"
    assert (elsewhere / "fold0" / "best.pt").read_bytes() == b"weights"
    assert (elsewhere / "fold1" / "best.pt").read_bytes() == b"kernel fold 1"
    assert not (local.parent / "fold1").exists(), "a kernel's folds stay together"
    assert any("local fold(s) 0 of `demo` differ from the kernel's: kept as they are; the kernel's folds go to "
               "`demo-kaggle-v1` (predict them with ARGS='name=demo-kaggle-v1')" in line for line in lines)
    kaggle_run(experiment, poll_seconds=0, log=lambda *_: None)        # the same download again: nothing moves
    assert sorted(p.name for p in Path(experiment.out_dir).iterdir()) == ["demo", "demo-kaggle-v1"]


def test_folds_trained_on_kaggle_predict_here_and_are_never_retrained(fake_kaggle, quick_config, tmp_path):
    from kit import api
    from kit.fold import train_fold
    from kit.runs import fold_dir

    on_kaggle = quick_config(epochs=1, out_dir=str(tmp_path / "kaggle-side"))
    api.train_all(on_kaggle, log=lambda *_: None)
    outputs = {"submission.csv": csv_bytes(competition_sample()), "sample_submission.csv":
               csv_bytes(competition_sample())}          # a notebook the user edited: no details JSON
    for fold in (0, 1):                                   # what keep_outputs copies: no last.pt
        for path in fold_dir(on_kaggle, fold).iterdir():
            if path.name != "last.pt":
                outputs[f"runs/demo/fold{fold}/{path.name}"] = path.read_bytes()
    fake_kaggle.kernel_outputs = outputs
    fake_kaggle.kernel_statuses = [("COMPLETE", "")]
    fake_kaggle.dataset_statuses = ["READY"]
    here = quick_config(epochs=1)
    with pytest.raises(KitError, match=r"row 2 has id 0{40}, which is not in sample_submission.csv"):   # DATA_DIR=
        kaggle_run(here, submit=True, data_dir=here.data_dir, poll_seconds=0, log=lambda *_: None)
    assert not fake_kaggle.submissions
    kaggle_run(here, submit=True, poll_seconds=0, log=lambda *_: None)      # the kernel's sample_submission.csv
    (submission,) = fake_kaggle.submissions
    assert submission["submissionDescription"].startswith("demo-kaggle-") and \
        submission["submissionDescription"].endswith("(kit submission)")

    lines = []
    assert train_fold(here, 0, log=lines.append)["epochs_trained"] == 1 and "already trained" in lines[0]
    assert api.predict(here, log=lambda *_: None).is_file()
    assert not (fold_dir(here, 0) / "last.pt").exists()


def test_kaggle_run_with_force_advises_a_flag_that_uploads_a_refused_csv(finished_kernel, experiment):
    """FORCE=1 in kaggle-run pushes a new kernel; a CSV refused at the submit step (not the competition's rows) is
    uploaded by `make submit FILE=… FORCE=1`, and the advice says so instead of "pass FORCE=1", which was passed."""
    small = competition_sample().head(400)
    finished_kernel.kernel_outputs = dict(finished_kernel.kernel_outputs, **{
        "submission.csv": csv_bytes(small.assign(label=0.5)), "sample_submission.csv": csv_bytes(small)})
    with pytest.raises(KitError) as refused:
        kaggle_run(experiment, submit=True, force=True, poll_seconds=0, log=lambda *_: None)
    message = str(refused.value)
    assert "nothing was sent" in message and re.search(r"make submit FILE=\S+\.csv FORCE=1", message), message
    assert "pass FORCE=1" not in message.lower()
    assert not finished_kernel.submissions
