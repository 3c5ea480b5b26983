"""Checkpoints: atomic writes, data-only loading, and errors that name the file and the problem."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from advcli import models
from advcli.data import DatasetInfo
from advcli.runs import checkpoint
from advcli.runs.checkpoint import CheckpointError

SPEC = models.model_spec("mlp", {"hidden": [16]}, DatasetInfo("tiny", num_classes=3, in_channels=1, image_size=8,
                                                             mean=(0.5,), std=(0.25,)))


def saved(tmp_path: Path, **extra) -> Path:
    torch.manual_seed(0)
    model = models.build_from_spec(SPEC)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"model": model.state_dict(), "model_spec": SPEC, "epoch": 1, **extra})
    return path


def test_round_trip_rebuilds_the_same_model(tmp_path):
    path = saved(tmp_path)
    model = models.rebuild_model(checkpoint.load(path), path)
    torch.manual_seed(0)
    original = models.build_from_spec(SPEC)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), original.eval()(x))
    assert not model.training
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "a temporary file was left behind"


class Payload:
    """Unpickling this would run `touch` on a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "model": Payload(marker)}, path)
    with open(tmp_path / "plain.pkl", "wb") as handle:  # the same payload through plain pickle does run
        pickle.dump(Payload(marker), handle)
    with pytest.raises(CheckpointError, match="refused") as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)
    assert not marker.exists(), "loading the checkpoint executed its payload"
    with open(tmp_path / "plain.pkl", "rb") as handle:
        pickle.load(handle)
    assert marker.exists(), "the payload itself is inert; the test would not notice it running"


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)


def test_a_file_that_is_not_an_advcli_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not an advcli checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_architecture(tmp_path):
    path = saved(tmp_path)
    payload = checkpoint.load(path)
    payload["model_spec"] = {**SPEC, "options": {"hidden": [32]}}
    with pytest.raises(CheckpointError, match="does not fit") as error:
        models.rebuild_model(payload, path)
    assert "mlp" in str(error.value) and str(path) in str(error.value)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = saved(tmp_path)
    before = path.read_bytes()

    def crash(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(path, crash)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_spec_is_the_plain_dict_checkpoints_have_always_recorded():
    assert SPEC == {"name": "mlp", "options": {"hidden": [16]}, "in_channels": 1, "image_size": 8, "num_classes": 3,
                    "mean": [0.5], "std": [0.25], "adversarial_class": False}
    folder = DatasetInfo("folder", num_classes=2, in_channels=3, image_size=4, mean=(0.1, 0.2, 0.3),
                         std=(0.4, 0.5, 0.6), classes=("cat", "dog"))
    own = models.model_spec("mine", {}, folder, normalize=([0.0] * 3, [1.0] * 3), adversarial_class=True,
                            target="pkg.Net", arguments={"width": 2})
    assert own == {"name": "mine", "options": {}, "in_channels": 3, "image_size": 4, "num_classes": 2,
                   "mean": [0.0] * 3, "std": [1.0] * 3, "adversarial_class": True, "classes": ["cat", "dog"],
                   "target": "pkg.Net", "arguments": {"width": 2}}
    assert pickle.loads(pickle.dumps(own)) == own and all(type(v) in (str, int, bool, list, dict) for v in own.values())
