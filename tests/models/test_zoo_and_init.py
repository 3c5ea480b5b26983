"""RobustBench in (a planted zoo model, loaded by the robustbench package without network access), RobustBench out
(model_info JSON in the leaderboard's schema, only from the leaderboard's protocol), and fine-tuning with init=."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advcli import models
from advcli.data import dataset_info
from advcli.errors import CheckpointError, ConfigError
from advcli.evaluation import leaderboard
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.models import sources, zoo
from advcli.runs import checkpoint
from advcli.training.train import train
from conftest import compose_config, tiny_overrides

PLANTED = "Tiny2026Planted"
# The field names of a RobustBench model_info file (model_info/cifar10/Linf/Wang2023Better_WRN-28-10.json in the
# robustbench repository), copied without its numbers.
MODEL_INFO_FIELDS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"]


class TinyZooNet(nn.Module):
    """A zoo-style CIFAR-10 model: it normalises inside itself and takes [0, 1] pixels."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x - self.mu)).flatten(1))


def offline(*args, **kwargs):
    raise ConnectionError("no network in this test")


@pytest.fixture
def planted_zoo(tmp_path, monkeypatch):
    """A tiny model registered in robustbench's own zoo table, its weights planted where robustbench looks; any
    download fails the test."""
    robustbench_utils = zoo.require_robustbench()  # as advcli imports it
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    monkeypatch.setitem(model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf], PLANTED,
                        {"model": TinyZooNet, "gdrive_id": "never-downloaded"})
    for name in ("download_gdrive", "download_gdrive_new"):  # its name differs between robustbench releases
        if hasattr(robustbench_utils, name):
            monkeypatch.setattr(robustbench_utils, name, offline)
    torch.manual_seed(0)
    trained = TinyZooNet()
    (tmp_path / "zoo" / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "zoo" / "cifar10" / "Linf" / f"{PLANTED}.pt")
    return tmp_path / "zoo", trained


def zoo_eval(out, zoo_dir, root, *extra):
    return compose_config("eval", [f"robustbench={PLANTED}", "dataset=cifar10", "threat_model=Linf", "eps=8/255",
                                   f"robustbench_dir={zoo_dir}", f"data.root={root}", "data.download=false",
                                   "device=cpu", "progress=false", f"output_dir={out}", *extra])


def test_a_planted_zoo_model_is_loaded_by_robustbench_and_evaluated_as_is(tmp_path, planted_zoo, cifar10_root):
    zoo_dir, trained = planted_zoo
    root, written = cifar10_root
    metrics = evaluate_checkpoint(zoo_eval(tmp_path / "eval", zoo_dir, root, "evaluation=fast",
                                           "evaluation.sanity.enabled=false"))
    images, labels = written["test"]
    x = torch.from_numpy(images).view(-1, 3, 32, 32).float() / 255
    with torch.no_grad():
        logits = trained(x)
    assert metrics["test"]["clean"]["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["test"]["clean"]["loss"] == pytest.approx(expected_loss, rel=1e-5)  # its own preprocessing only
    assert {k: metrics["source"][k] for k in ("kind", "name", "threat_model", "model_dir", "mean", "std")} == {
        "kind": "robustbench", "name": PLANTED, "threat_model": "Linf", "model_dir": str(zoo_dir),
        "mean": [0.0] * 3, "std": [1.0] * 3}


def test_a_zoo_model_missing_offline_says_where_robustbench_looked(tmp_path, planted_zoo, cifar10_root):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'}/cifar10/Linf/{PLANTED}.pt"):
        evaluate_checkpoint(zoo_eval(tmp_path / "eval", tmp_path / "empty", cifar10_root[0]))
    with pytest.raises(ConfigError, match="no cifar10 Linf model of that name"):
        evaluate_checkpoint(zoo_eval(tmp_path / "eval", planted_zoo[0], cifar10_root[0], "robustbench=Nobody2099"))


def test_standard_autoattack_on_the_whole_test_set_writes_a_model_info_entry(tmp_path, planted_zoo, cifar10_root):
    entry_path = tmp_path / "entry.json"
    metrics = evaluate_checkpoint(zoo_eval(tmp_path / "eval", planted_zoo[0], cifar10_root[0], "evaluation=autoattack",
                                           "evaluation.sanity.enabled=false", f"model_info.path={entry_path}",
                                           "model_info.name=A planted model", "model_info.venue=Tests 2026"))
    entry = json.loads(entry_path.read_text())
    assert list(entry) == MODEL_INFO_FIELDS
    assert entry["clean_acc"] == f"{100 * metrics['test']['clean']['acc']:.2f}"
    assert entry["autoattack_acc"] == f"{100 * metrics['test']['autoattack']['acc']:.2f}"
    assert (entry["eps"], entry["dataset"], entry["name"], entry["venue"]) == ("8/255", "cifar10", "A planted model",
                                                                              "Tests 2026")


@pytest.mark.parametrize("extra,fragment", [(["evaluation=fast"], "does not run AutoAttack"),
                                            (["evaluation=autoattack", "evaluation.num_examples=2"], "subset"),
                                            (["evaluation=autoattack", "+evaluation.attacks.autoattack.attacks=[apgd-ce]"],
                                             "not the standard version"),
                                            (["evaluation=autoattack", "evaluation.amp=bf16"], "reduced precision"),
                                            (["evaluation=autoattack", "eps=[4/255,8/255]"], "not a curve"),
                                            (["+attack@evaluation.attacks.autoattack=autoattack"], "runs in a cascade")])
def test_a_leaderboard_entry_from_another_protocol_is_refused_before_any_work(tmp_path, planted_zoo, cifar10_root,
                                                                              extra, fragment):
    cfg = zoo_eval(tmp_path / "eval", planted_zoo[0], cifar10_root[0], *extra, f"model_info.path={tmp_path / 'e.json'}")
    with pytest.raises(ConfigError, match=fragment):
        evaluate_checkpoint(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "e.json").exists()


def test_eps_is_written_as_robustbench_writes_it():
    assert [leaderboard.eps_text(8 / 255), leaderboard.eps_text(0.3), leaderboard.eps_text(0.2, "l2"),
            leaderboard.eps_text(1.0, "l2")] == ["8/255", "0.3", "0.2", "1"]


def test_a_zoo_model_is_attacked_in_its_own_threat_model():
    assert (zoo.threat_norm("Linf", None), zoo.threat_norm("L2", None), zoo.threat_norm("L2", "l2")) == (
        "linf", "l2", "l2")
    with pytest.raises(ConfigError, match="contradicts threat_model=L2"):
        zoo.threat_norm("L2", "linf")
    with pytest.raises(ConfigError, match="corruptions models are not attacked"):
        zoo.threat_norm("corruptions", None)


# --- init= ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_class_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("four")
    train(compose_config("train", tiny_overrides(run, "evaluation.num_examples=32", "evaluation.sanity.enabled=false")))
    return run / "checkpoint.pt"


def test_init_keeps_the_body_and_gives_new_classes_a_new_head(four_class_run):
    source = checkpoint.load(four_class_run)
    cfg = compose_config("train", ["model=mlp", "dataset=synthetic", "dataset.num_classes=3"])
    spec = sources.spec_from_config(cfg.model, dataset_info("synthetic", num_classes=3))
    model = models.build_from_spec(spec)
    record = sources.initialise(model, str(four_class_run), "auto", spec, robustbench_dir="models")
    head = sources.head_keys(model.net.state_dict(), model.net)
    assert record["head"] == "reset" and record["kind"] == "checkpoint" and len(head) == 2
    for key, value in model.net.state_dict().items():
        trained = source["model"][f"net.{key}"]
        if key in head:
            assert value.shape[0] == 3 and trained.shape[0] == 4
        else:
            assert torch.equal(value, trained), key
    with pytest.raises(ConfigError, match="init_head=reset"):
        sources.initialise(models.build_from_spec(spec), str(four_class_run), "keep", spec, robustbench_dir="")


def test_a_fine_tuning_run_records_where_it_started(tmp_path, four_class_run):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, f"init={four_class_run}", "dataset.num_classes=3",
                                                           "evaluation.sanity.enabled=false",
                                                           "evaluation.num_examples=32")))
    assert metrics["init"]["init"] == str(four_class_run) and metrics["init"]["head"] == "reset"
    assert checkpoint.load(tmp_path / "checkpoint.pt")["config"]["init"] == str(four_class_run)
    with pytest.raises(ConfigError, match="holds a mlp model"):
        train(compose_config("train", tiny_overrides(tmp_path / "other", f"init={four_class_run}", "model=small_cnn")))
    with pytest.raises(ConfigError, match="another scale"):
        train(compose_config("train", tiny_overrides(tmp_path / "scale", f"init={four_class_run}",
                                                     "model.normalize=none")))


def test_a_resumed_fine_tuning_run_keeps_the_record_of_what_it_started_from(tmp_path, four_class_run):
    start = tmp_path / "start.pt"
    start.write_bytes(four_class_run.read_bytes())
    run = tmp_path / "run"
    overrides = tiny_overrides(run, f"init={start}", "evaluation.sanity.enabled=false", "evaluation.num_examples=32")
    first = train(compose_config("train", overrides))
    start.write_bytes(b"not the weights it started from")  # the path now holds something else
    resumed = train(compose_config("train", [*overrides, "epochs=2"]))
    assert resumed["epochs_trained"] == 2 and resumed["init"] == first["init"]
    assert resumed["init"]["sha256"] == sources.file_digest(four_class_run)


def test_init_from_a_robustbench_zoo_model_fine_tunes_it(tmp_path, planted_zoo, cifar10_root):
    zoo_dir, trained = planted_zoo
    cfg = compose_config("train", tiny_overrides(tmp_path, "model=robustbench", f"model.zoo_name={PLANTED}",
                                                 "init=robustbench", f"robustbench_dir={zoo_dir}", "dataset=cifar10",
                                                 f"data.root={cifar10_root[0]}", "data.download=false", "lr=1e-9",
                                                 "evaluation.sanity.enabled=false", "attack=none", "eps=8/255"))
    metrics = train(cfg)
    assert metrics["init"] == {"kind": "robustbench", "name": PLANTED, "init": "robustbench", "head": "kept"}
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert torch.allclose(saved["model"]["net.model.conv.weight"], trained.conv.weight, atol=1e-6)  # lr ~ 0


def class_folder(root, classes, per_class=6):
    """An ImageFolder tree (train/ and test/) of 8x8 images, one folder per class name."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(classes))
    for split in ("train", "test"):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(60 + 80 * k + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def folder_spec(path):
    cfg = compose_config("train", ["model=mlp", "model.normalize=none", "dataset=folder", f"dataset.path={path}"])
    return sources.spec_from_config(cfg.model, dataset_info("folder", path=str(path), image_size=8))


def test_init_gives_a_head_trained_on_other_class_names_a_new_one_even_when_its_shape_fits(tmp_path):
    source_run = tmp_path / "ab-run"
    train(compose_config("train", tiny_overrides(
        source_run, "dataset=folder", f"dataset.path={class_folder(tmp_path / 'ab', ['a', 'b'])}",
        "dataset.image_size=8", "model.normalize=none", "batch_size=8", "data.val_size=2",
        "evaluation.sanity.enabled=false")))
    trained = checkpoint.load(source_run / "checkpoint.pt")["model"]
    spec = folder_spec(class_folder(tmp_path / "cd", ["c", "d"]))
    model = models.build_from_spec(spec)
    head = sources.head_keys(model.net.state_dict(), model.net)
    record = sources.initialise(model, str(source_run / "checkpoint.pt"), "auto", spec, robustbench_dir="")
    assert record["head"] == "reset" and record["classes"] == ["a", "b"]
    for key, value in model.net.state_dict().items():
        source_value = trained[f"net.{key}"]
        assert value.shape == source_value.shape
        assert (not torch.equal(value, source_value)) if key in head else torch.equal(value, source_value), key
    with pytest.raises(ConfigError, match=r"init_head=keep: its last layer was trained on the classes \['a', 'b'\]"):
        sources.initialise(models.build_from_spec(spec), str(source_run / "checkpoint.pt"), "keep", spec,
                           robustbench_dir="")
    same = folder_spec(class_folder(tmp_path / "ab-again", ["a", "b"]))
    kept = sources.initialise(models.build_from_spec(same), str(source_run / "checkpoint.pt"), "auto", same,
                              robustbench_dir="")
    assert kept["head"] == "kept"
