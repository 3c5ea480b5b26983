"""ResNet-18 from torchvision, adapted to small images.

``torchvision.models.resnet18`` (He, Zhang, Ren, Sun 2016, "Deep Residual Learning for Image
Recognition", post-activation basic blocks) with the usual change for 28x28 and 32x32 inputs: the
7x7 stride-2 stem and its 3x3 max-pool, made for 224x224 ImageNet images, become one 3x3 stride-1
convolution and no pool, so the four stages see 32, 16, 8 and 4 pixels per side on CIFAR (the
ImageNet stem would leave 8, 4, 2, 1). This is the CIFAR "ResNet-18" of many adversarial-training
papers (e.g. Pang et al. 2021, "Bag of Tricks for Adversarial Training"); `preact_resnet18` is its
pre-activation sibling.
"""

from __future__ import annotations

import torch
from torch import nn

from advcli.models.checks import require_positive


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with a 3x3 stride-1 stem taking ``in_channels`` and no max-pool.

    Stem: conv3x3 (64, stride 1) -> BN -> ReLU. Stages: 64/128/256/512 channels with strides
    1/2/2/2, two basic blocks each. Head: global average pool -> linear. The layers are
    torchvision's own modules under torchvision's names (``conv1``, ``bn1``, ``layer1`` ...
    ``layer4``, ``fc``; ``maxpool`` is an ``nn.Identity``), initialised as torchvision does.
    About 11.17M parameters for CIFAR-10 (torchvision's 11.18M for 10 classes, less 7,680
    from the smaller stem).

    torchvision is imported when the model is built, so that importing ``advcli.models`` stays
    light for runs that never use it.

    Arguments:
        in_channels (int): image channels C.
        image_size (int): image height and width H = W. Accepted so every model has the same
            signature; the adaptive pool makes any size work (>= 8 recommended: three stride-2
            stages divide it by 8).
        num_classes (int): number of outputs K.

    Shape:
        - Input: ``(N, C, H, W)``, already normalised.
        - Output: ``(N, K)`` logits.

    Examples::
        >>> net = ResNet18(in_channels=3, image_size=32, num_classes=10)
        >>> net(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        require_positive("ResNet18", in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        net.maxpool = nn.Identity()
        # adopt torchvision's layers under their own names, so state_dict keys are torchvision's
        for name, module in net.named_children():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's ResNet._forward_impl
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
