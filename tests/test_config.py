"""Config values as typed: eps parsing, validation of every key, and the shipped config tree."""

from __future__ import annotations

import pytest
import torch

from advcli import config, runtime
from advcli.errors import ConfigError
from advcli.runs import paths
from conftest import compose_config


@pytest.mark.parametrize("text,expected", [("8/255", 8 / 255), ("0.03137", 0.03137), ("0", 0.0), (0, 0.0),
                                           (0.3, 0.3), ("1", 1.0), ("1e-3", 1e-3), (" 2/255 ", 2 / 255)])
def test_parse_eps_accepts_what_users_type(text, expected):
    assert config.parse_eps(text) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("text,fragment", [("8/0", "divides by zero"), ("-1", "negative"), (-0.1, "negative"),
                                           ("abc", "not a number"), ("1.5", "larger than 1"), (2, "larger than 1"),
                                           (True, "not a number"), ("", "not a number")])
def test_parse_eps_rejects_bad_values_with_a_hint(text, fragment):
    with pytest.raises(ConfigError) as error:
        config.parse_eps(text)
    message = str(error.value)
    assert fragment in message and "eps=8/255" in message and "\n" not in message


def test_l2_eps_may_exceed_one_but_not_the_cube_diameter():
    assert config.parse_eps("2.0", norm="l2", dim=784) == 2.0
    with pytest.raises(ConfigError, match="diameter"):
        config.parse_eps("29", norm="l2", dim=784)


def test_format_eps_shows_the_255_fraction():
    assert config.format_eps(8 / 255) == "0.03137 (8/255)"
    assert config.format_eps(0.3) == "0.3"


def test_train_config_composes_with_every_group_and_eps_as_typed():
    cfg = compose_config("train", ["attack=pgd", "eps=8/255", "model=preact_resnet18", "dataset=cifar10"])
    assert cfg.eps == "8/255" and config.parse_eps(cfg.eps) == pytest.approx(8 / 255)
    assert cfg.attack._target_ == "advcli.attacks.pgd" and cfg.attack.norm == "linf"
    assert cfg.model.name == "preact_resnet18" and cfg.dataset.name == "cifar10"
    assert list(cfg.evaluation.standalone_attacks) == ["clean", "fgsm", "pgd"]
    assert list(cfg.evaluation.attacks) == ["pgd_margin", "apgd_ce", "apgd_t", "fab_t", "square"]
    assert cfg.evaluation.name == "default" and cfg.evaluation.cascade
    cfg = compose_config("train", ["restarts=4", "norm=l2", "evaluation=fast"])
    assert set(cfg.evaluation.attacks) == {"clean", "fgsm", "pgd", "pgd_margin"}
    assert cfg.evaluation.attacks.pgd.steps >= 20 > cfg.attack.steps
    assert cfg.attack.restarts == 4 and cfg.evaluation.attacks.pgd.restarts == 4
    assert cfg.attack.norm == "l2" and cfg.evaluation.attacks.fgsm.norm == "l2" and cfg.validation.attack.norm == "l2"


# the README's table of config groups; each choice: what the composed group must hold (by default its `name`)
DOCUMENTED_CHOICES = {
    "model": {"mlp": {}, "cnn": {}, "small_cnn": {}, "preact_resnet18": {}, "resnet18": {},
              "wrn28_10": {"name": "wide_resnet", "depth": 28, "widen_factor": 10},  # one architecture, two sizes
              "wrn34_10": {"name": "wide_resnet", "depth": 34, "widen_factor": 10}},
    "dataset": {"mnist": {}, "fashion_mnist": {}, "cifar10": {}, "cifar100": {}, "svhn": {}, "synthetic": {}},
    "attack": {"none": {"_target_": "advcli.attacks.none"}, "fgsm": {"_target_": "advcli.attacks.fgsm"},
               "pgd": {"_target_": "advcli.attacks.pgd", "loss": "ce"},
               "pgd_margin": {"_target_": "advcli.attacks.pgd", "loss": "margin"},
               "apgd_ce": {"_target_": "advcli.attacks.apgd", "loss": "ce"},
               "apgd_t": {"_target_": "advcli.attacks.apgd_targeted"},
               "square": {"_target_": "advcli.attacks.square"}},
    "evaluation": {"default": {"cascade": True}, "fast": {"cascade": False}, "autoattack": {"cascade": False}},
    "trainer": {"minmax": {"_target_": "advcli.training.objectives.MinMax"},
                "trades": {"_target_": "advcli.training.objectives.Trades"},
                "mart": {"_target_": "advcli.training.objectives.Mart", "beta": 6.0},
                "adv_class": {"_target_": "advcli.training.objectives.AdversarialClass"}},
    "optimizer": {"adam": {"_target_": "torch.optim.Adam"}, "sgd": {"_target_": "torch.optim.SGD"}},
}


@pytest.mark.parametrize("group,choices", DOCUMENTED_CHOICES.items(), ids=list(DOCUMENTED_CHOICES))
def test_config_groups_offer_the_documented_choices(group, choices):
    for choice, expected in choices.items():
        cfg = compose_config("train", [f"{group}={choice}"])
        if group != "optimizer":  # optimizers are named by their _target_ only
            expected = {"name": choice, **expected}
        assert {key: cfg[group].get(key) for key in expected} == expected, f"{group}={choice}"


def test_trainer_standard_is_the_former_name_of_minmax_and_runs_recorded_under_it_read_as_minmax():
    assert compose_config("train", ["trainer=standard"]).trainer == compose_config("train", []).trainer
    assert compose_config("train", []).trainer.name == "minmax"
    before = {"attack": {"name": "pgd"}, "trainer": {"name": "standard", "_target_": "advcli.objectives.MinMax"}}
    now = {"attack": {"name": "pgd"}, "trainer": {"name": "minmax", "_target_": "advcli.training.objectives.MinMax"}}
    assert config.training_label(before) == config.training_label(now) == "pgd-trained"
    assert config.training_label({**now, "trainer": {"name": "trades"}}) == "trades (pgd)"
    assert config.fingerprint_changes(config.flatten(before), config.flatten(now)) == []
    assert config.fingerprint_changes(config.flatten({**before, "trainer": {"name": "trades"}}), config.flatten(now))


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVCLI_DATA", str(tmp_path))
    cfg = compose_config("train", [])
    assert cfg.data.root == str(tmp_path)


@pytest.mark.parametrize("override,key", [("epochs=0", "epochs"), ("batch_size=0", "batch_size"),
                                          ("restarts=0", "restarts"), ("attack.steps=0", "attack.steps"),
                                          ("evaluation.attacks.apgd_ce.steps=-1", "evaluation.attacks.apgd_ce.steps"),
                                          ("lr=-1", "lr"), ("norm=l1", "norm"), ("amp=fp8", "amp"),
                                          ("lr_schedule=step", "lr_schedule"), ("attack_mode=test", "attack_mode"),
                                          ("lr_peak=1", "lr_peak"), ("lr_peak=0", "lr_peak"),
                                          ("trainer=trades trainer.beta=-1", "trainer.beta"),
                                          ("trainer=trades trainer.beta=abc", "trainer.beta"),
                                          ("trainer=adv_class trainer.adv_weight=2", "trainer.adv_weight"),
                                          ("trainer=mart trainer.beta=-1", "trainer.beta"),
                                          ("awp.gamma=-0.01", "awp.gamma"), ("awp.gamma=abc", "awp.gamma"),
                                          ("awp.warmup=-1", "awp.warmup"),
                                          ("awp.gamma=0.005 awp.warmup=7 epochs=7", "awp.warmup")])
def test_bad_values_are_refused_by_name(override, key):
    cfg = compose_config("train", override.split())
    with pytest.raises(ConfigError) as error:
        config.run_settings(cfg)
        config.check_training(cfg)
    assert f"{key}=" in str(error.value)


def test_unwritable_output_directory_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be written"):
        paths.check_writable(blocker / "run")


def test_amp_auto_picks_bf16_only_where_the_cpu_has_it():
    cpu = torch.device("cpu")
    assert runtime.resolve_amp("auto", cpu, native_bf16=False) is None
    assert runtime.resolve_amp("auto", cpu, native_bf16=True) is torch.bfloat16
    assert runtime.resolve_amp("off", cpu, native_bf16=True) is None
    assert runtime.resolve_amp(False, cpu) is None  # YAML's unquoted `off`
    assert runtime.resolve_amp("fp16", cpu) is torch.float16


def test_device_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ConfigError, match="device=cpu"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError):
        runtime.resolve_device("tpu")


@pytest.mark.parametrize("overrides,fragment", [
    (["attack=fgsm", "restarts=3"], "attack.random_start=true"),          # restarts that would never happen
    (["attack=autoattack"], "evaluation attack"),                          # not a training attack
    (["attack.loss=dlr", "dataset.num_classes=2"], "at least 3 classes"),  # DLR would crash mid-run
    (["norm=l2", "attack.norm=linf", "eps=2"], "One run has one threat model"),
    (["trainer=trades", "attack=none"], "standard training under another name"),
    (["+attack.stepz=3"], "attack.stepz is not a setting of pgd"),
    (["+attack@evaluation.attacks.aa=autoattack", "dataset.num_classes=3"], "at least 4 classes"),
    (["+evaluation.focus.square=0.1"], "evaluation.focus is no longer a setting"),  # it skipped examples on a guess
])
def test_settings_that_cannot_do_what_they_say_are_refused_before_any_work(tmp_path, overrides, fragment):
    # in-process (the shell's exit status 2 and one paragraph: test_reliability's shell test)
    from advcli.training.train import train

    with pytest.raises(ConfigError) as error:
        train(compose_config("train", ["dataset=synthetic", "model=mlp", "device=cpu", "progress=false",
                                       "evaluation=fast", *overrides, f"output_dir={tmp_path / 'run'}"]))
    assert fragment in str(error.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_fgsm_restarts_with_a_random_start_are_allowed_and_recorded():
    cfg = compose_config("train", ["attack=fgsm", "attack.random_start=true", "restarts=3"])
    config.check_attack("attack", cfg.attack)
    assert config.instantiate("attack", cfg.attack).keywords["restarts"] == 3


def test_names_come_from_the_config_choice():
    cfg = compose_config("train", ["attack=pgd_margin", "trainer=trades"])
    assert config.choice_name(cfg.attack, "attack") == "pgd_margin" and config.attack_kind(cfg.attack) == "pgd"
    assert config.choice_name(cfg.trainer, "trainer") == "trades"
    assert config.training_label(config.plain(cfg)) == "trades (pgd_margin)"


def test_the_fingerprint_leaves_out_process_settings_and_normalises_eps():
    a = config.fingerprint(compose_config("train", ["eps=8/255", "device=cpu", "progress=false"]), precision="fp32")
    b = config.fingerprint(compose_config("train", ["eps=0.03137254901960784", "log_every=5"]), precision="fp32")
    assert a == b and config.fingerprint_id(a) == config.fingerprint_id(b)
    c = config.fingerprint(compose_config("train", ["eps=8/255", "attack.steps=7"]), precision="fp32")
    assert config.fingerprint_changes(a, c) == [("attack.steps", 5, 7)]
    assert not any(key.startswith(("device", "progress", "data.root")) for key in a)


@pytest.mark.parametrize("start,fragment", [({"random_start": False}, "attack.random_start=true"),
                                            ({"start": "zero"}, "attack.start=uniform")])
def test_restarts_of_an_attack_that_starts_at_x_are_refused_whichever_way_the_start_is_spelt(start, fragment):
    from omegaconf import OmegaConf
    attack = OmegaConf.create({"name": "mine", "_target_": "advcli.attacks.pgd", "_partial_": True, "restarts": 3,
                               **start})
    with pytest.raises(ConfigError, match=fragment):
        config.check_attack("attack", attack)
    config.check_attack("attack", OmegaConf.merge(attack, {"restarts": 1}))
