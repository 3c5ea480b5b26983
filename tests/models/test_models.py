"""Tests for advcli.models: shapes, the Madry layer sizes, the ResNets' and WideResNets' structure and
parameter counts, Normalize, build_model errors, input gradients, channels_last, bfloat16 autocast.
CPU only, no data. The tests that run every model of the registry build wide_resnet as WRN-10-1 (see
SMALL) to stay fast; WRN-28-10's and WRN-34-10's sizes are checked without a forward pass (one WRN-28-10
forward runs in test_datasets_models.py). Two tests run `advcli train` on the synthetic set to see a ModelError
reach the shell as one paragraph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcli.models import (
    MODELS,
    MLP,
    MadryCNN,
    ModelError,
    Normalize,
    PreActResNet18,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    is_convolutional,
    uses_batchnorm,
)
from conftest import run_advcli

# (in_channels, image_size): MNIST-like, CIFAR-like, tiny synthetic
INPUTS = {"mnist": (1, 28), "cifar": (3, 32), "tiny": (1, 12)}
STATS = {1: ((0.1307,), (0.3081,)), 3: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))}
# the smallest form of a model whose size is an option, for the tests that run every model
SMALL = {"wide_resnet": {"depth": 10, "widen_factor": 1}}


def make(name: str, in_channels: int, image_size: int, num_classes: int = 10, **kwargs) -> nn.Module:
    """Model ``name`` built by build_model under seed 0, in its SMALL form unless ``kwargs`` say otherwise."""
    torch.manual_seed(0)
    mean, std = STATS[in_channels]
    return build_model(
        name, in_channels=in_channels, image_size=image_size, num_classes=num_classes, mean=mean, std=std,
        **{**SMALL.get(name, {}), **kwargs}
    )


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def feature_sides(net: nn.Module, stages: list[nn.Module], x: torch.Tensor) -> list[int]:
    """The side of the feature map each of ``stages`` outputs for input ``x`` (eval mode)."""
    sides = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1])) for s in stages]
    net.eval()(x)
    for h in hooks:
        h.remove()
    return sides


def pixels(n: int, in_channels: int, image_size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, in_channels, image_size, image_size, generator=g)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("num_classes", [10, 11])
@pytest.mark.parametrize("data", list(INPUTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape(name: str, data: str, num_classes: int) -> None:
    in_channels, image_size = INPUTS[data]
    model = make(name, in_channels, image_size, num_classes)
    out = model(pixels(3, in_channels, image_size))
    assert out.shape == (3, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_registry_names_and_classes() -> None:
    assert MODELS == {"mlp": MLP, "cnn": MadryCNN, "small_cnn": SmallCNN, "preact_resnet18": PreActResNet18,
                      "resnet18": ResNet18, "wide_resnet": WideResNet}


def test_madry_cnn_has_paper_layer_sizes_on_mnist() -> None:
    net = MadryCNN(in_channels=1, image_size=28, num_classes=10)
    assert net.conv1.weight.shape == (32, 1, 5, 5)
    assert net.conv2.weight.shape == (64, 32, 5, 5)
    assert net.fc1.weight.shape == (1024, 7 * 7 * 64)
    assert net.fc2.weight.shape == (10, 1024)
    # 3,274,634 trainable parameters in the MNIST challenge model
    assert sum(p.numel() for p in net.parameters()) == 3_274_634


@pytest.mark.parametrize("image_size, side", [(28, 7), (32, 8), (12, 3), (13, 3)])
def test_madry_cnn_fc_input_follows_image_size(image_size: int, side: int) -> None:
    net = MadryCNN(in_channels=3, image_size=image_size, num_classes=10, width=2)
    assert net.conv1.weight.shape == (64, 3, 5, 5)
    assert net.conv2.weight.shape == (128, 64, 5, 5)
    assert net.fc1.in_features == 128 * side * side
    assert net(torch.randn(2, 3, image_size, image_size)).shape == (2, 10)


def test_madry_cnn_pools_before_relu_and_computes_the_papers_function() -> None:
    # the forward pools first (cheaper); max commutes with ReLU, so outputs and input gradients are
    # those of the paper's conv -> ReLU -> pool order
    torch.manual_seed(0)
    net = MadryCNN(in_channels=1, image_size=28, num_classes=10)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)

    def paper_order(x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(net.conv1(x)), 2)
        h = F.max_pool2d(F.relu(net.conv2(h)), 2)
        return net.fc2(F.relu(net.fc1(h.flatten(1))))

    ours, reference = net(x), paper_order(x)
    torch.testing.assert_close(ours, reference)
    y = torch.arange(4)
    torch.testing.assert_close(torch.autograd.grad(F.cross_entropy(ours, y), x)[0],
                               torch.autograd.grad(F.cross_entropy(reference, y), x)[0])


def test_small_cnn_has_wong_and_kolter_layer_sizes_on_mnist() -> None:
    net = SmallCNN(in_channels=1, image_size=28, num_classes=10)
    assert net.conv1.weight.shape == (16, 1, 4, 4) and net.conv1.stride == (2, 2)
    assert net.conv2.weight.shape == (32, 16, 4, 4) and net.conv2.stride == (2, 2)
    assert net.fc1.weight.shape == (100, 32 * 7 * 7)
    assert net.fc2.weight.shape == (10, 100)
    assert SmallCNN(in_channels=3, image_size=32, num_classes=10, width=2).fc1.in_features == 64 * 8 * 8
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(in_channels=1, image_size=3, num_classes=10)


def test_madry_cnn_rejects_images_too_small_to_pool_twice() -> None:
    with pytest.raises(ValueError, match="image_size"):
        MadryCNN(in_channels=1, image_size=3, num_classes=10)


def test_mlp_hidden_sizes() -> None:
    net = MLP(in_channels=3, image_size=8, num_classes=11, hidden=(64, 32, 16))
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 192), (32, 64), (16, 32), (11, 16)]
    linear_only = MLP(in_channels=1, image_size=12, num_classes=10, hidden=())
    assert [m.weight.shape for m in linear_only.modules() if isinstance(m, nn.Linear)] == [(10, 144)]


def test_preact_resnet18_parameter_count_on_cifar10() -> None:
    net = PreActResNet18(in_channels=3, image_size=32, num_classes=10)
    count = num_parameters(net)
    # Wong et al. 2020's CIFAR-10 PreActResNet18 has about 11.17M parameters
    assert 11_100_000 <= count <= 11_300_000, count


def test_preact_resnet18_structure() -> None:
    net = PreActResNet18(in_channels=3, image_size=32, num_classes=10)
    assert net.conv1.weight.shape == (64, 3, 3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    assert [s[0].conv1.stride for s in stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert [s[-1].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    assert net.linear.weight.shape == (10, 512)
    # feature map shrinks 32 -> 32, 16, 8, 4 through the stages
    assert feature_sides(net, stages, torch.randn(1, 3, 32, 32)) == [32, 16, 8, 4]


def test_resnet18_is_torchvision_resnet18_with_a_small_image_stem() -> None:
    from torchvision.models import resnet18

    net = ResNet18(in_channels=3, image_size=32, num_classes=10)
    reference = resnet18(num_classes=10)
    assert net.conv1.weight.shape == (64, 3, 3, 3)
    assert net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1) and net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity) and not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    # torchvision's layers under torchvision's names; only the stem's shape differs
    assert net.state_dict().keys() == reference.state_dict().keys()
    assert {k: v.shape for k, v in net.state_dict().items() if k != "conv1.weight"} == {
        k: v.shape for k, v in reference.state_dict().items() if k != "conv1.weight"}
    assert reference.conv1.weight.shape == (64, 3, 7, 7)
    # the usual CIFAR ResNet-18: 11,173,962 parameters, torchvision's less the 7x7 -> 3x3 stem difference
    assert num_parameters(net) == num_parameters(reference) - (7 * 7 - 3 * 3) * 3 * 64 == 11_173_962
    assert net.fc.weight.shape == (10, 512)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    assert feature_sides(net, stages, torch.randn(1, 3, 32, 32)) == [32, 16, 8, 4]
    grey = ResNet18(in_channels=1, image_size=28, num_classes=11)
    assert grey.conv1.weight.shape == (64, 1, 3, 3) and grey.fc.out_features == 11
    assert feature_sides(grey, [grey.layer1, grey.layer4], torch.randn(1, 1, 28, 28)) == [28, 4]


@pytest.mark.parametrize("depth, widen_factor, count", [(28, 10, 36_479_194), (34, 10, 46_160_474)])
def test_wide_resnet_parameter_counts(depth: int, widen_factor: int, count: int) -> None:
    # WRN-28-10 36.5M and WRN-34-10 46.2M on CIFAR-10, the sizes reported for the TRADES and RobustBench models;
    # built on the meta device: shapes without memory, initialisation or a forward
    with torch.device("meta"):
        net = WideResNet(in_channels=3, image_size=32, num_classes=10, depth=depth, widen_factor=widen_factor)
    assert num_parameters(net) == count
    blocks = [len(g) for g in (net.layer1, net.layer2, net.layer3)]
    assert blocks == [(depth - 4) // 6] * 3
    assert [g[-1].conv2.out_channels for g in (net.layer1, net.layer2, net.layer3)] == [160, 320, 640]


def test_wide_resnet_structure() -> None:
    net = WideResNet(in_channels=3, image_size=32, num_classes=10, depth=16, widen_factor=2)
    assert net.conv1.weight.shape == (16, 3, 3, 3) and net.conv1.stride == (1, 1)
    groups = [net.layer1, net.layer2, net.layer3]
    assert [len(g) for g in groups] == [2, 2, 2]  # depth 16 = 6 * 2 + 4
    assert [g[-1].conv2.out_channels for g in groups] == [32, 64, 128]
    assert [g[0].conv1.stride for g in groups] == [(1, 1), (2, 2), (2, 2)]
    assert [g[1].conv1.stride for g in groups] == [(1, 1)] * 3
    # a 1x1 shortcut where the width or stride changes (every group's first block here), else the identity
    assert [g[0].shortcut is not None for g in groups] == [True, True, True]
    assert all(g[1].shortcut is None for g in groups)
    assert WideResNet(in_channels=3, image_size=32, num_classes=10, depth=10, widen_factor=1).layer1[0].shortcut is None
    assert net.bn.num_features == 128 and net.linear.weight.shape == (10, 128)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.Dropout)) for m in net.modules())
    assert feature_sides(net, groups, torch.randn(1, 3, 32, 32)) == [32, 16, 8]
    grey = WideResNet(in_channels=1, image_size=28, num_classes=11, depth=10, widen_factor=1)
    assert grey.conv1.weight.shape == (16, 1, 3, 3) and grey.linear.out_features == 11
    assert feature_sides(grey, [grey.layer1, grey.layer2, grey.layer3], torch.randn(1, 1, 28, 28)) == [28, 14, 7]
    # TRADES' initialisation: He-normal over the fan-out, linear bias zero
    assert torch.count_nonzero(net.linear.bias) == 0
    fan_out = 3 * 3 * 128
    assert net.layer3[1].conv2.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


def test_wide_resnet_dropout_acts_in_training_only() -> None:
    x = pixels(4, 3, 32)
    with_dropout = make("wide_resnet", 3, 32, dropout=0.3)
    assert not torch.equal(with_dropout.train()(x), with_dropout(x))
    torch.testing.assert_close(with_dropout.eval()(x), with_dropout(x), rtol=0, atol=0)
    without = make("wide_resnet", 3, 32)
    torch.testing.assert_close(without.train()(x), without(x), rtol=0, atol=0)


@pytest.mark.parametrize("options, words", [
    ({"depth": 27}, ["depth=27", "6n + 4", "model.depth=28"]),
    ({"depth": 4}, ["depth=4", "6n + 4"]),
    ({"depth": 30}, ["depth=30", "6n + 4"]),
    ({"depth": 28.0}, ["depth=28.0", "6n + 4"]),
    ({"widen_factor": 0}, ["widen_factor=0", "integer >= 1"]),
    ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
])
def test_wide_resnet_refuses_bad_options_with_a_model_error(options: dict, words: list[str]) -> None:
    with pytest.raises(ModelError) as info:
        make("wide_resnet", 3, 32, **options)
    message = str(info.value)
    assert all(word in message for word in words), message
    assert "\n" not in message, "one paragraph"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_construction_is_deterministic_under_manual_seed(name: str) -> None:
    a, b = make(name, 3, 32).state_dict(), make(name, 3, 32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    c = build_model(name, in_channels=3, image_size=32, num_classes=10, mean=STATS[3][0], std=STATS[3][1],
                    **SMALL.get(name, {}))
    assert not all(torch.equal(a[k], v) for k, v in c.state_dict().items() if v.is_floating_point())


# ---------------------------------------------------------------- Normalize


def test_normalize_is_per_channel() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    norm = Normalize(mean, std)
    x = torch.rand(4, 3, 5, 5)
    out = norm(x)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - mean[c]) / std[c])
    # a constant image equal to the mean maps to zero
    torch.testing.assert_close(norm(torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 4, 4)), torch.zeros(2, 3, 4, 4))


def test_normalize_buffers_move_with_to() -> None:
    norm = Normalize((0.5, 0.25), (0.5, 0.125))
    assert norm.mean.shape == (1, 2, 1, 1) and norm.std.shape == (1, 2, 1, 1)
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert set(norm.state_dict()) == {"mean", "std"}
    assert list(norm.parameters()) == []  # never trained
    double = norm.to(torch.float64)
    assert double.mean.dtype == torch.float64 and double.std.dtype == torch.float64
    assert double(torch.rand(1, 2, 3, 3, dtype=torch.float64)).dtype == torch.float64
    meta = Normalize((0.5,), (0.5,)).to("meta")
    assert meta.mean.device.type == "meta" and meta.std.device.type == "meta"


@pytest.mark.parametrize(
    "mean, std",
    [((0.5, 0.5), (0.5,)), ((), ()), ((0.5,), (0.0,)), ((0.5,), (-1.0,))],
)
def test_normalize_rejects_bad_statistics(mean, std) -> None:
    with pytest.raises(ValueError):
        Normalize(mean, std)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_model_normalizes_first(name: str) -> None:
    model = make(name, 3, 32).eval()
    assert list(dict(model.named_children())) == ["normalize", "net"]
    assert isinstance(model[0], Normalize)
    mean, std = STATS[3]
    x = pixels(2, 3, 32)
    pre = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net(pre))
    # and the normalisation matters: raw pixels through .net give something else
    assert not torch.allclose(model(x), model.net(x))


def test_build_model_passes_architecture_options() -> None:
    mlp = build_model("mlp", in_channels=1, image_size=12, num_classes=11, mean=(0.5,), std=(0.5,), hidden=[8])
    assert mlp.net.layers[1].weight.shape == (8, 144)
    cnn = build_model("cnn", in_channels=1, image_size=12, num_classes=10, mean=(0.5,), std=(0.5,), width=2)
    assert cnn.net.conv1.out_channels == 64


# ---------------------------------------------------------------- build_model errors


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet50", in_channels=3, image_size=32, num_classes=10, mean=STATS[3][0], std=STATS[3][1])
    message = str(info.value)
    assert "resnet50" in message
    assert "cnn, mlp, preact_resnet18, resnet18, robustbench, small_cnn, wide_resnet" in message  # sorted
    assert "model=" in message


@pytest.mark.parametrize("name, option", [("mlp", "width"), ("cnn", "hidden"), ("preact_resnet18", "width"),
                                          ("resnet18", "width"), ("wide_resnet", "width")])
def test_unknown_option_names_it_and_the_accepted_ones(name: str, option: str) -> None:
    with pytest.raises(ModelError) as info:
        make(name, 1, 28, **{option: 2})
    message = str(info.value)
    assert option in message and name in message
    accepted = {"mlp": "hidden", "cnn": "width", "preact_resnet18": "(none)", "resnet18": "(none)",
                "wide_resnet": "depth, dropout, widen_factor"}[name]
    assert accepted in message


def test_mean_std_must_match_in_channels() -> None:
    with pytest.raises(ModelError, match="in_channels=1"):
        build_model("cnn", in_channels=1, image_size=28, num_classes=10, mean=STATS[3][0], std=STATS[3][1])


@pytest.mark.parametrize("override, words", [
    ("+model.width=2", ["'mlp'", "width", "Options it accepts: hidden"]),            # build_model's check
    ("model=wrn28_10 model.depth=27", ["depth=27", "6n + 4", "model.depth=28"]),  # WideResNet's own check
])
def test_a_model_error_reaches_the_shell_as_one_paragraph_and_exit_status_2(tmp_path, override, words) -> None:
    run_dir = tmp_path / "run"
    result = run_advcli("train", "dataset=synthetic", "model=mlp", *override.split(), "device=cpu", "progress=false",
                        f"hydra.run.dir={run_dir}", env={"CUDA_VISIBLE_DEVICES": ""})
    errors = [line for line in result.stderr.splitlines() if line.startswith("advcli: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert all(word in errors[0] for word in words), errors[0]
    assert "Traceback" not in result.stderr and not (run_dir / "checkpoint.pt").exists()


def test_a_bug_inside_a_model_is_not_mistaken_for_a_model_error(tmp_path) -> None:
    # MLP's own ValueError (not a ModelError): a bug to advcli, so it keeps its traceback and is not exit status 2
    with pytest.raises(ValueError, match="positive sizes"):
        make("mlp", 1, 12, hidden=[-5])
    result = run_advcli("train", "dataset=synthetic", "model=mlp", "model.hidden=[-5]", "device=cpu",
                        "progress=false", f"hydra.run.dir={tmp_path / 'run'}", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode not in (0, 2) and "positive sizes" in result.stderr
    assert not any(line.startswith("advcli: error:") for line in result.stderr.splitlines()), result.stderr


# ---------------------------------------------------------------- helpers


def test_uses_batchnorm_and_is_convolutional() -> None:
    expected = {"mlp": (False, False), "cnn": (False, True), "small_cnn": (False, True),
                "preact_resnet18": (True, True), "resnet18": (True, True), "wide_resnet": (True, True)}
    for name, (bn, conv) in expected.items():
        model = make(name, 1, 12)
        assert uses_batchnorm(model) is bn, name
        assert is_convolutional(model) is conv, name
    assert uses_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not is_convolutional(nn.Sequential(nn.Conv1d(1, 1, 3)))


# ---------------------------------------------------------------- autograd, memory format, dtype


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_reaches_the_input(name: str) -> None:
    model = make(name, 3, 32).eval()
    x = pixels(2, 3, 32).requires_grad_(True)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # every example gets its own gradient
    assert (grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if n != "mlp"])
def test_channels_last_matches_contiguous(name: str, mode: str) -> None:
    model = make(name, 3, 32)
    model.train(mode == "train")
    x = pixels(4, 3, 32)
    out = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    torch.testing.assert_close(model_cl(x_cl), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("data", ["mnist", "cifar"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_autocast(name: str, data: str) -> None:
    in_channels, image_size = INPUTS[data]
    model = make(name, in_channels, image_size).eval()
    x = pixels(2, in_channels, image_size)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    # bfloat16 has ~3 significant digits; the logits stay close to float32
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)
