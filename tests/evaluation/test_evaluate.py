"""Evaluation: attack strength ordering, what each attack spends its work on, eval mode, eps lists and
the robustness curve, and AutoAttack (the `pyautoattack` package, installed by the `test` extra)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from advcli.attacks import pgd
from advcli.attacks.reference import apgd, autoattack
from advcli.cli import eps_list_as_typed
from advcli.errors import MissingExtra
from advcli.evaluation.eval_command import evaluate_checkpoint
from advcli.evaluation.evaluate import attack_outcomes, evaluate, evaluation_attacks
from advcli.training.train import train
from conftest import TinyConvNet, compose_config, run_advcli, tiny_overrides



def default_attacks(*overrides: str):
    """The fast evaluation's attacks (each on every example), as `advcli eval evaluation=fast` composes them."""
    cfg = compose_config("eval", ["evaluation=fast", "ckpt=unused", "norm=linf", "restarts=1", "evaluation=fast", *overrides])
    return evaluation_attacks(cfg.evaluation.attacks)


def batches_of(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_fast_evaluation_has_fgsm_ce_and_margin_pgd_with_early_stop():
    _, described = default_attacks()
    assert list(described) == ["clean", "fgsm", "pgd", "pgd_margin"]
    assert described["pgd"]["attack_loss"] == "ce" and described["pgd_margin"]["attack_loss"] == "margin"
    for name in ("pgd", "pgd_margin"):
        assert described[name]["steps"] == 20 and described[name]["early_stop"] is True


class Saturated(torch.nn.Module):
    """``model`` with its logits scaled by 1000: the same decisions, but a softmax so confident that the
    cross-entropy gradient underflows to exactly zero in fp32 (the defensive-distillation failure of
    Carlini & Wagner 2016). The logit margin only scales, so its signed gradient steps do not change."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1000 * self.model(x)


def test_margin_pgd_breaks_at_least_as_many_as_ce_pgd(robust_mlp):
    model, x, y = robust_mlp
    found, _ = default_attacks()
    torch.manual_seed(0)
    plain = evaluate(model, batches_of(x, y), found, eps=0.1)
    torch.manual_seed(0)
    saturated = evaluate(Saturated(model).eval(), batches_of(x, y), found, eps=0.1)
    print({name: (plain[name]["acc"], saturated[name]["acc"]) for name in plain})
    assert saturated["pgd_margin"]["acc"] <= saturated["pgd"]["acc"] - 0.2, "CE-PGD should stall on a saturated softmax"
    assert abs(saturated["pgd_margin"]["acc"] - plain["pgd_margin"]["acc"]) <= 2 / len(y)  # scale does not matter
    assert saturated["any_attack"]["acc"] <= saturated["pgd_margin"]["acc"]


def test_any_attack_is_the_per_example_worst_case(robust_mlp):
    model, x, y = robust_mlp
    found, _ = default_attacks()
    torch.manual_seed(0)
    outcomes = attack_outcomes(model, batches_of(x, y), found, eps=0.1)
    results = outcomes.summary()
    assert results["pgd"]["acc"] <= results["fgsm"]["acc"] < results["clean"]["acc"]
    unbroken = torch.stack(list(outcomes.correct.values())).all(dim=0)
    assert results["any_attack"]["acc"] == unbroken.float().mean().item() > 0
    assert results["any_attack"]["acc"] < min(results[name]["acc"] for name in found)  # the attacks complement


def test_each_attack_only_sees_correctly_classified_examples(tiny_model, tiny_batch):
    model, (x, y) = tiny_model, tiny_batch  # a random model: about a third of the examples right
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    seen = []

    def spy(model, x_batch, y_batch, eps):
        seen.append(len(y_batch))
        return x_batch

    outcomes = attack_outcomes(model, batches_of(x, y, 8), {"spy": spy, "pgd": lambda m, a, b, e: pgd(m, a, b, e)},
                               eps=0.1)
    assert 0 < sum(seen) == int(clean.sum()) < len(y)
    assert torch.equal(outcomes.clean, clean) and torch.equal(outcomes.correct["spy"], clean)
    assert not (outcomes.correct["pgd"] & ~clean).any(), "a misclassified example counted as robust"


def test_evaluation_freezes_batchnorm_and_never_updates_the_model(tiny_batch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tiny_batch
    found, _ = default_attacks()
    evaluate(model, batches_of(x, y % 4, 16), found, eps=0.1)
    assert model.training, "the model must come back in the mode it came in"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during evaluation"
    assert all(p.grad is None for p in model.parameters())


def test_eps_list_as_typed_becomes_one_list_unless_multirun():
    assert eps_list_as_typed(["ckpt=a", "eps=0,1/255,2/255"]) == ["ckpt=a", "eps=[0,1/255,2/255]"]
    assert eps_list_as_typed(["eps=[0,1/255]"]) == ["eps=[0,1/255]"]
    assert eps_list_as_typed(["eps=8/255", "evaluation.attacks.pgd.steps=5"]) == ["eps=8/255",
                                                                                  "evaluation.attacks.pgd.steps=5"]
    assert eps_list_as_typed(["-m", "eps=0.1,0.2"]) == ["-m", "eps=0.1,0.2"]
    assert eps_list_as_typed(["eps=range(0,3)"]) == ["eps=range(0,3)"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose_config("train", tiny_overrides(run, "evaluation.num_examples=64")))
    return run / "checkpoint.pt"


def test_eval_with_an_eps_list_writes_the_robustness_curve(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "eval"
    metrics = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", 
        f"ckpt={tiny_checkpoint}", "eps=[0,1/255,0.05,0.1]", "evaluation.num_examples=64", "device=cpu",
        "progress=false", f"output_dir={out}"]))
    assert [point["eps_text"] for point in metrics["curve"]] == ["0", "1/255", "0.05", "0.1"]
    assert metrics["eps"] == pytest.approx(0.1) and metrics["test"] == metrics["curve"][-1]["test"]
    rows = list(csv.DictReader((out / "robustness_curve.csv").open()))
    assert [row["eps_text"] for row in rows] == ["0", "1/255", "0.05", "0.1"]
    assert set(rows[0]) >= {"eps", "clean", "fgsm", "pgd", "pgd_margin", "any_attack"}
    assert float(rows[0]["pgd"]) == float(rows[0]["clean"])  # eps=0: no attack moves anything
    assert float(rows[-1]["any_attack"]) <= float(rows[1]["any_attack"])
    assert (out / "robustness_curve.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["sanity"]["verdict"] in ("pass", "warn") and len(on_disk["sanity"]["checks"]) >= 5
    printed = capsys.readouterr().out
    assert "any attack" in printed and "sanity checks" in printed and "1/255" in printed


@pytest.mark.slow
def test_eval_eps_list_as_typed_from_the_shell(tmp_path, tiny_checkpoint):
    result = run_advcli("eval", "evaluation=fast", f"ckpt={tiny_checkpoint}", "eps=0,0.05,0.1", "evaluation.num_examples=64", "device=cpu",
                    "progress=false", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader((tmp_path / "robustness_curve.csv").open()))) == 3
    assert "sanity checks" in result.stdout


# --- AutoAttack -----------------------------------------------------------------------------------

def test_autoattack_breaks_at_least_what_pgd_breaks_and_stays_in_the_ball(tiny_batch):
    torch.manual_seed(0)
    model = TinyConvNet(num_classes=4).eval()
    x, y, eps = tiny_batch[0][:16], tiny_batch[1][:16] % 4, 0.01  # some examples survive all four attacks
    state = torch.get_rng_state()
    x_aa = autoattack(model, x, y, eps)
    assert torch.equal(torch.get_rng_state(), state), "AutoAttack's reseeding leaked into the caller's generator"
    assert ((x_aa - x).abs().amax() <= eps + 1e-6) and x_aa.min() >= 0 and x_aa.max() <= 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    torch.manual_seed(0)
    x_pgd = pgd(model, x, y, eps, steps=20, early_stop=True)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        aa_acc = (model(x_aa).argmax(1) == y).float().mean()
        pgd_acc = (model(x_pgd).argmax(1) == y).float().mean()
    print(f"clean {clean:.3f} PGD-20 {pgd_acc:.3f} AutoAttack {aa_acc:.3f}")
    assert 0 < aa_acc <= pgd_acc < clean


def test_eval_attack_autoattack_adds_it_next_to_the_defaults(tmp_path, tiny_checkpoint):
    metrics = evaluate_checkpoint(compose_config("eval", ["evaluation=fast", 
        f"ckpt={tiny_checkpoint}", "attack=autoattack", "evaluation.num_examples=32", "device=cpu",
        "progress=false", f"output_dir={tmp_path}"]))
    assert list(metrics["test"]) == ["clean", "fgsm", "pgd", "pgd_margin", "autoattack", "any_attack"]
    row = metrics["test"]["autoattack"]
    assert row["attack"] == "autoattack" and row["version"] == "standard" and row["norm"] == "linf"
    assert row["acc"] <= metrics["test"]["clean"]["acc"]
    checks = {check["name"]: check for check in metrics["sanity"]["checks"]}
    assert "autoattack_agrees_with_pgd" in checks and "AutoAttack" in checks["autoattack_agrees_with_pgd"]["detail"]


def test_missing_autoattack_package_says_how_to_install_it(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if it were not installed
    with pytest.raises(MissingExtra, match=r"pip install pyautoattack"):
        autoattack(TinyConvNet(4), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    with pytest.raises(MissingExtra, match="evaluation=fast"):  # the default evaluation's attacks too
        apgd(TinyConvNet(4), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.1)
    with pytest.raises(MissingExtra):  # in advcli eval: before any other attack runs
        evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={tiny_checkpoint}", "attack=autoattack", "device=cpu",
                                                    "progress=false", f"output_dir={tmp_path}"]))


def test_attack_choice_that_clashes_with_a_default_attack_is_refused(tmp_path, tiny_checkpoint):
    from advcli.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.attacks.pgd"):
        evaluate_checkpoint(compose_config("eval", ["evaluation=fast", f"ckpt={tiny_checkpoint}", "attack=pgd", "device=cpu",
                                                    "progress=false", f"output_dir={tmp_path}"]))


def test_a_retired_evaluation_setting_is_refused_before_loading_data(tmp_path, tiny_checkpoint):
    from advcli.errors import ConfigError
    from advcli.evaluation.eval_command import check_eval_settings

    with pytest.raises(ConfigError, match="evaluation.escalate is no longer a setting"):
        check_eval_settings(compose_config("eval", [f"ckpt={tiny_checkpoint}", "+evaluation.escalate.attacks.apgd_t.steps=3",
                                                    "device=cpu", f"output_dir={tmp_path}"]))


def test_autoattack_runs_the_part_of_its_version_that_is_asked_for(monkeypatch):
    import pyautoattack
    from advcli.errors import ConfigError

    ran = []
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation",
                        lambda self, x, y, **_: (ran.append(list(self.attacks_to_run)), (x, y))[1])
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    autoattack(TinyConvNet(4).eval(), x, y, 0.1, attacks=["apgd-ce", "apgd-t"])
    autoattack(TinyConvNet(4).eval(), x, y, 0.1)
    assert ran == [["apgd-ce", "apgd-t"], ["apgd-ce", "apgd-t", "fab-t", "square"]]
    with pytest.raises(ConfigError, match="apgd-x"):
        autoattack(TinyConvNet(4).eval(), x, y, 0.1, attacks=["apgd-ce", "apgd-x"])


def test_autoattack_refuses_inputs_the_reference_code_cannot_handle():
    from advcli.errors import ConfigError

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ConfigError, match="at least 4 classes"):
        autoattack(TinyConvNet(3).eval(), x, y, 0.1)
    with pytest.raises(ConfigError, match="L2 Square attack cannot handle 8x8"):
        autoattack(TinyConvNet(4).eval(), x, y, 0.5, norm="l2")


CHEAP_DEFAULT = ["evaluation.attacks.apgd_ce.steps=5", "evaluation.attacks.apgd_t.steps=5",
                 "evaluation.attacks.fab_t.steps=5", "evaluation.attacks.square.queries=50",
                 "evaluation.sanity.enabled=false", "evaluation.num_examples=64", "device=cpu", "progress=false"]


def test_an_attack_added_on_the_command_line_runs_alone_on_every_example_beside_the_cascade(tmp_path, tiny_checkpoint,
                                                                                            capsys):
    metrics = evaluate_checkpoint(compose_config("eval", [f"ckpt={tiny_checkpoint}", "attack=autoattack",
                                                          "+attack.attacks=[apgd-ce]", *CHEAP_DEFAULT,
                                                          f"output_dir={tmp_path}"]))
    rows = metrics["test"]
    right = round(rows["clean"]["acc"] * 64)
    # FGSM, PGD and the added AutoAttack each ran on every correctly classified example, the cascade on what was left
    assert rows["autoattack"]["attacked"] == rows["fgsm"]["attacked"] == rows["pgd"]["attacked"] == right
    assert not any(rows[name].get("in_cascade") for name in ("clean", "fgsm", "pgd", "autoattack"))
    assert all(rows[name]["in_cascade"] for name in ("pgd_margin", "apgd_ce", "apgd_t", "fab_t", "square"))
    standing_alone = min(rows[name]["acc"] for name in ("fgsm", "pgd", "autoattack"))
    assert rows["pgd_margin"]["attacked"] <= round(standing_alone * 64)
    assert rows["any_attack"]["acc"] == rows["square"]["acc"] <= standing_alone
    printed = capsys.readouterr().out
    table = printed[printed.index("attack "):]
    assert table.index("pgd ") < table.index("then a cascade on what those left standing") < table.index("pgd_margin")


def test_a_checkpoint_with_an_adversarial_input_output_is_evaluated_as_advcli_train_evaluates_it(tmp_path):
    run = tmp_path / "run"
    train(compose_config("train", tiny_overrides(run, "trainer=adv_class", "evaluation.num_examples=32",
                                                 "evaluation.sanity.enabled=false")))
    metrics = evaluate_checkpoint(compose_config("eval", [f"ckpt={run / 'checkpoint.pt'}", "evaluation.num_examples=32",
                                                          "device=cpu", "progress=false", f"output_dir={tmp_path / 'e'}"]))
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation"] == "fast" and "pgd_adaptive" in metrics["test"]
    assert set(metrics["test"]) == set(trained["test"])


def test_the_evaluation_progress_bar_moves_once_per_attack_per_batch(robust_mlp, monkeypatch, capsys):
    """A bar per pass over the examples, one step each time an attack is done with a batch (an evaluation whose
    every batch takes minutes still moves); ``progress=false`` draws nothing."""
    from tqdm.auto import tqdm

    from advcli import data
    from advcli.evaluation import evaluate as evaluate_module
    from advcli.evaluation.cascade import Outcomes
    from advcli.evaluation.evaluate import EvalSettings, evaluate_model

    bars = []

    class Counting(tqdm):
        def __init__(self, *args, **kwargs):
            self.updates = 0
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n=1):
            self.updates += n
            return super().update(n)

    monkeypatch.setattr(evaluate_module, "tqdm", Counting)
    model, x, y = robust_mlp
    images = data.ImageSet((x[:80] * 255).round().to(torch.uint8), y[:80])  # 80 examples: 3 batches of 32
    attack_cfgs = dict(compose_config("eval", ["evaluation=fast", "ckpt=unused", "norm=linf", "restarts=1",
                                               "evaluation.attacks.pgd.steps=2",
                                               "evaluation.attacks.pgd_margin.steps=2"]).evaluation.attacks)
    runs = {"fast": dict(cascade=False), "cascade": dict(cascade=True, alone=("fgsm",))}
    for name, how in runs.items():
        bars.clear()
        evaluate_model(model, images, attack_cfgs, EvalSettings(eps_values=((0.05, "0.05"),), norm="linf",
                                                                batch_size=32, progress=True, **how))
        counts = [(bar.desc, bar.total, bar.updates) for bar in bars]
        expected = ([("test: attacks", 12, 12)] if name == "fast" else  # 4 attacks x 3 batches
                    [("test: each attack alone", 3, 3), ("test: cascade", 9, 9)])
        assert counts == expected, name
    assert capsys.readouterr().err  # the bars were drawn

    bars.clear()
    evaluate_model(model, images, attack_cfgs, EvalSettings(eps_values=((0.05, "0.05"),), norm="linf",
                                                            batch_size=32, progress=False))
    assert [bar.disable for bar in bars] == [True] and capsys.readouterr().err == ""

    # built by keyword only: a positional call would silently swap fields
    with pytest.raises(TypeError):
        EvalSettings(((0.05, "0.05"),), "linf")
    with pytest.raises(TypeError):
        Outcomes(torch.ones(2, dtype=torch.bool))
