"""Your own architecture (model._target_): a class of one's own trains with every trainer, resumes, is evaluated
and fine-tuned from its checkpoint, which records it by import path and is refused in one paragraph when the class
is gone; released weights of any architecture (saved on a GPU, several state_dicts in a file, same-shape layers in
another order); timm's architectures."""

from __future__ import annotations

import signal
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from advcli import data, models
from advcli.errors import CheckpointError, ConfigError, Interrupted
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.models import sources, uses_batchnorm, weights
from advcli.runs import checkpoint
from advcli.training import epoch as epoch_module
from advcli.training.train import train
from conftest import REPO, compose_config, run_advcli, tiny_overrides

MODULE = "advcli_test_nets"  # the module of one's own, written by the `own_code` fixture
CODE = '''
import torch
from torch import nn


class WideNet(nn.Module):
    """A conv net of one's own: advcli passes in_channels, image_size and num_classes; width comes from the config."""

    def __init__(self, in_channels, image_size, num_classes, width=2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * width, 3, padding=1)
        self.bn = nn.BatchNorm2d(4 * width)
        self.head = nn.Linear(4 * width * (image_size // 2) ** 2, num_classes)

    def forward(self, x):
        return self.head(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


class FixedNet(nn.Module):
    """Four outputs whatever the data: its constructor has no num_classes."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        self.head = nn.Linear(in_channels * image_size ** 2, 4)

    def forward(self, x):
        return self.head(x.flatten(1))


class NarrowNet(WideNet):
    """WideNet after its author dropped the width argument."""

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__(in_channels, image_size, num_classes, width=3)
'''
OWN = ["model=custom", f"model._target_={MODULE}.WideNet", "+model.width=3"]
QUICK = ["attack.steps=2", "evaluation.num_examples=64", "evaluation.sanity.enabled=false"]


@pytest.fixture(scope="module")
def own_code(tmp_path_factory):
    """The folder of the module of one's own, on sys.path for this file's tests (as PYTHONPATH puts it)."""
    folder = tmp_path_factory.mktemp("code")
    (folder / f"{MODULE}.py").write_text(CODE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def own_run(out: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, *OWN, "epochs=2", *QUICK, *extra)


@pytest.fixture(scope="module")
def trained(own_code, tmp_path_factory):
    """Two epochs of WideNet (BatchNorm, EMA of the weights) on the synthetic set: (checkpoint path, metrics)."""
    out = tmp_path_factory.mktemp("own")
    return out / "checkpoint.pt", train(compose_config("train", own_run(out)))


def eval_overrides(out: Path, *extra: str) -> list[str]:
    return ["evaluation=fast", "evaluation.sanity.enabled=false", "evaluation.num_examples=64", "device=cpu",
            "progress=false", f"output_dir={out}", *extra]


def test_a_class_of_ones_own_trains_and_its_checkpoint_rebuilds_it_by_import(trained, tmp_path, caplog):
    ckpt, metrics = trained
    spec = checkpoint.load(ckpt)["model_spec"]
    assert spec["target"] == f"{MODULE}.WideNet" and metrics["model"] == f"{MODULE}.WideNet"
    assert spec["arguments"] == {"in_channels": 1, "image_size": 12, "num_classes": 4, "width": 3}
    model = models.rebuild_model(checkpoint.load(ckpt))
    assert list(dict(model.named_children())) == ["normalize", "net"] and uses_batchnorm(model)
    with caplog.at_level("INFO"):
        again = evaluate_checkpoint(compose_config("eval", eval_overrides(tmp_path, f"ckpt={ckpt}")))
    assert f"rebuilding model from class {MODULE}.WideNet recorded in {ckpt}" in caplog.text
    assert again["test"] == metrics["test"]  # every row: accuracy, loss, settings
    assert metrics["test"]["clean"]["acc"] > 0.5


def test_an_interrupted_run_of_ones_own_class_resumes_to_the_same_result(trained, tmp_path, monkeypatch):
    real_step, steps = epoch_module.train_step, []

    def step_then_sigint(*args, **kwargs):  # Ctrl-C in the middle of epoch 2 (8 batches an epoch)
        steps.append(1)
        if len(steps) == 10:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "train_step", step_then_sigint)
    with pytest.raises(Interrupted):
        train(compose_config("train", own_run(tmp_path)))
    stopped = checkpoint.load(tmp_path / "checkpoint.pt")
    assert stopped["epoch"] == 1 and stopped["partial"]["batches"] == 2
    monkeypatch.undo()
    resumed = train(compose_config("train", own_run(tmp_path)))
    assert resumed["test"] == trained[1]["test"]
    straight, again = checkpoint.load(trained[0]), checkpoint.load(tmp_path / "checkpoint.pt")
    for key in ("model", "train_model"):  # the EMA and the trained weights
        assert all(torch.equal(tensor, again[key][name]) for name, tensor in straight[key].items()), key


@pytest.mark.parametrize("trainer", ["trades", "adv_class"])
def test_every_trainer_trains_a_class_of_ones_own(own_code, tmp_path, trainer):
    metrics = train(compose_config("train", tiny_overrides(tmp_path, *OWN, f"trainer={trainer}", "attack.steps=1",
                                                           "data.train_size=64", "evaluation.num_examples=16",
                                                           "evaluation.sanity.enabled=false")))
    spec = checkpoint.load(tmp_path / "checkpoint.pt")["model_spec"]
    assert metrics["trainer"] == trainer and spec["arguments"]["num_classes"] == (5 if trainer == "adv_class" else 4)


def test_a_class_whose_outputs_cannot_be_set_is_refused_before_any_work(own_code, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("data was loaded before the refusal"))
    fixed = ["model=custom", f"model._target_={MODULE}.FixedNet"]
    with pytest.raises(ConfigError, match=r"returns shape \(2, 4\).*needs \(2, 5\).*no num_classes parameter"):
        train(compose_config("train", tiny_overrides(tmp_path, *fixed, "trainer=adv_class")))
    info = data.dataset_info("synthetic")
    sources.check_model(compose_config("train", fixed).model, info, adversarial_class=False)  # 4 classes: it fits
    for overrides, fragment in ((["model=custom"], "model._target_ is required"),
                                (["model=custom", "model._target_=nowhere_at_all.Net"], "cannot be imported"),
                                ([*OWN, "+model.depth=3"], "cannot be called with"),
                                ([*OWN, "+model.num_classes=3"], "passes in_channels, image_size, num_classes")):
        with pytest.raises(ConfigError, match=fragment):
            sources.check_model(compose_config("train", overrides).model, info, adversarial_class=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_init_fine_tunes_a_class_of_ones_own_from_its_checkpoint(trained, tmp_path):
    ckpt = trained[0]
    metrics = train(compose_config("train", tiny_overrides(tmp_path, *OWN, f"init={ckpt}", "dataset.num_classes=3",
                                                           "lr=1e-9", *QUICK)))
    assert metrics["init"]["kind"] == "checkpoint" and metrics["init"]["head"] == "reset"
    started, tuned = checkpoint.load(ckpt)["model"], checkpoint.load(tmp_path / "checkpoint.pt")["model"]
    assert torch.allclose(tuned["net.conv.weight"], started["net.conv.weight"], atol=1e-6)  # the body, lr ~ 0
    assert tuned["net.head.weight"].shape[0] == 3


def test_a_checkpoint_whose_class_was_renamed_is_refused_in_one_paragraph(trained, tmp_path):
    payload = checkpoint.load(trained[0])
    for old_name, fragment in (("OldNet", "cannot be imported here"), ("NarrowNet", "constructor now takes")):
        moved = tmp_path / f"{old_name}.pt"
        checkpoint.save(moved, {**payload, "model_spec": {**payload["model_spec"], "target": f"{MODULE}.{old_name}"}})
        with pytest.raises(ConfigError) as refused:
            evaluate_checkpoint(compose_config("eval", eval_overrides(tmp_path / "e", f"ckpt={moved}")))
        message = str(refused.value)
        assert fragment in message and f"{MODULE}.{old_name}" in message and str(moved) in message, message
        assert "model._target_=" in message and "\n" not in message
    assert "PYTHONPATH" in message or "version of the code" in message
    renamed = evaluate_checkpoint(compose_config("eval", eval_overrides(
        tmp_path / "override", f"ckpt={tmp_path / 'OldNet.pt'}", "model=custom", f"model._target_={MODULE}.WideNet")))
    assert renamed["test"] == trained[1]["test"]


def test_a_checkpoint_naming_a_callable_that_is_not_a_module_class_is_refused_without_calling_it(trained, tmp_path):
    payload = checkpoint.load(trained[0])
    planted = tmp_path / "planted.pt"
    spec = {**payload["model_spec"], "target": "os.system", "arguments": {"command": f"touch {tmp_path / 'ran'}"}}
    checkpoint.save(planted, {**payload, "model_spec": spec})
    with pytest.raises(ConfigError, match=r"os.system \(recorded in .*planted.pt\) is a builtin_function_or_method, "
                                          "not a subclass of torch.nn.Module"):
        models.rebuild_model(checkpoint.load(planted), planted)
    assert not (tmp_path / "ran").exists()


def test_a_model_config_of_ones_own_trains_from_the_shell_and_a_missing_module_is_one_paragraph(tmp_path):
    code, conf = tmp_path / "code", tmp_path / "conf" / "model"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "shell_nets.py").write_text(CODE)
    (conf / "widenet.yaml").write_text("name: widenet\n_target_: shell_nets.WideNet\nwidth: 2\nnormalize: dataset\n")
    done = run_advcli("train", "--config-dir", str(tmp_path / "conf"), *tiny_overrides(
        tmp_path / "run", "model=widenet", "data.train_size=64", "attack.steps=1", "evaluation.num_examples=16",
        "evaluation.sanity.enabled=false"), env={"PYTHONPATH": f"{code}:{REPO}"})
    assert done.returncode == 0, done.stderr
    spec = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["model_spec"]
    assert (spec["name"], spec["target"], spec["options"]) == ("widenet", "shell_nets.WideNet", {"width": 2})
    refused = run_advcli("eval", f"ckpt={tmp_path / 'run' / 'checkpoint.pt'}", f"output_dir={tmp_path / 'eval'}",
                         env={"PYTHONPATH": str(REPO)})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (paragraph,) = [line for line in refused.stderr.splitlines() if line.startswith("advcli: error:")]
    assert "shell_nets.WideNet" in paragraph and "No module named 'shell_nets'" in paragraph
    assert "PYTHONPATH" in paragraph and str(tmp_path / "run" / "checkpoint.pt") in paragraph


def saved_on_a_gpu(state: dict, path: Path) -> None:
    """``torch.save`` as on a GPU machine: every storage's recorded location says cuda:0 (patched in data.pkl)."""
    plain = path.with_suffix(".cpu")
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in content
                content = content.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(item, content)


def test_released_weights_saved_on_a_gpu_load_into_a_class_of_ones_own_on_the_cpu(own_code, tmp_path):
    from advcli_test_nets import WideNet

    torch.manual_seed(1)
    released = WideNet(1, 12, 4, width=3)
    path = tmp_path / "released.pth"
    saved_on_a_gpu({"state_dict": {f"module.{k}": v for k, v in released.state_dict().items()}}, path)
    if not torch.cuda.is_available():  # the file really says cuda: torch's default loader refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    imported = tmp_path / "imported.pt"
    metrics = evaluate_checkpoint(compose_config("eval", eval_overrides(
        tmp_path / "eval", f"weights={path}", *OWN, "dataset=synthetic", "eps=0.1", f"save_checkpoint={imported}")))
    loaded = checkpoint.load(imported)
    assert all(torch.equal(loaded["model"][f"net.{k}"], v) for k, v in released.state_dict().items())
    assert loaded["model_spec"]["target"] == f"{MODULE}.WideNet" and metrics["source"]["renamed_keys"] > 0


def test_two_same_shape_layers_in_another_order_are_matched_by_name_or_refused():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(stem=nn.Linear(4, 8), a=nn.Linear(8, 8), b=nn.Linear(8, 8),
                                      head=nn.Linear(8, 2)))
    layers = {name: nn.Linear(*shape) for name, shape in (("stem", (4, 8)), ("a", (8, 8)), ("b", (8, 8)),
                                                          ("head", (8, 2)))}
    by_name = OrderedDict((f"{name}.{kind}", getattr(layers[name], kind)) for name in ("stem", "b", "a", "head")
                          for kind in ("weight", "bias"))
    weights.load_weights(model, by_name, where="test")
    assert torch.equal(model.a.weight, layers["a"].weight) and torch.equal(model.b.weight, layers["b"].weight)
    unnamed = OrderedDict((f"layers.{k}.{kind}", getattr(layers[name], kind))
                          for k, name in enumerate(("stem", "b", "a", "head")) for kind in ("weight", "bias"))
    with pytest.raises(CheckpointError, match="the model's layers 'a' and 'b' have tensors of the same shapes"):
        weights.load_weights(model, unnamed, where="test")


def test_a_file_of_several_state_dicts_is_refused_unless_weights_key_chooses(own_code, tmp_path):
    from advcli_test_nets import WideNet

    trained, averaged = WideNet(1, 12, 4, width=3), WideNet(1, 12, 4, width=3)
    path = tmp_path / "both.pt"
    torch.save({"model": trained.state_dict(), "ema": averaged.state_dict(), "epoch": 30}, path)
    with pytest.raises(CheckpointError, match="several state_dicts: 'model' .* 'ema' .*weights_key=ema"):
        evaluate_checkpoint(compose_config("eval", eval_overrides(tmp_path / "a", f"weights={path}", *OWN,
                                                                  "dataset=synthetic", "eps=0.1")))
    metrics = evaluate_checkpoint(compose_config("eval", eval_overrides(
        tmp_path / "b", f"weights={path}", "weights_key=ema", *OWN, "dataset=synthetic", "eps=0.1",
        f"save_checkpoint={tmp_path / 'ema.pt'}")))
    assert metrics["source"]["weights_key"] == "ema"
    assert torch.equal(checkpoint.load(tmp_path / "ema.pt")["model"]["net.conv.weight"], averaged.conv.weight)
    spec = sources.spec_from_config(compose_config("train", OWN).model, data.dataset_info("synthetic"))
    state, record = sources.init_source(str(path), spec, "", key="model")  # init= takes the same setting
    assert torch.equal(state["conv.weight"], trained.conv.weight) and record["weights_key"] == "model"
    with pytest.raises(CheckpointError, match="several state_dicts"):
        sources.init_source(str(path), spec, "")


def test_a_timm_architecture_builds_and_trains_one_step(tmp_path):
    metrics = train(compose_config("train", tiny_overrides(
        tmp_path, "model=timm", "model.name=test_byobnet", "data.train_size=64", "attack.steps=1",
        "evaluation.num_examples=16", "evaluation.sanity.enabled=false", "ema.decay=null")))
    payload = checkpoint.load(tmp_path / "checkpoint.pt")
    assert payload["model_spec"]["target"] == "advcli.models.timm_net.timm_model"
    assert payload["model_spec"]["arguments"] == {"in_channels": 1, "num_classes": 4, "architecture": "test_byobnet"}
    assert metrics["model"] == "test_byobnet" and len(metrics["history"]) == 1
    assert uses_batchnorm(models.rebuild_model(payload))
