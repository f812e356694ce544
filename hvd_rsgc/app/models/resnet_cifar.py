"""CIFAR-style ResNet (He et al. 2016, sec. 4.2): a 3x3 stem with 16 channels, three stages of
n basic blocks with 16/32/64 channels (stride 2 between stages), option-A shortcuts (stride-2
subsampling + zero-padded channels, no parameters), global average pooling, one linear layer.
Depth 6n+2: ResNet-20 (n=3), -56 (n=9), -110 (n=18). Global pooling makes any input size work
(32 native; 64 or 256 for RS scenes)."""
import torch.nn as nn
import torch.nn.functional as F


class _ShortcutA(nn.Module):
    def __init__(self, planes_out, planes_in):
        super().__init__()
        self.pad = planes_out - planes_in

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _ShortcutA(cout, cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, n: int, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {n}")
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for b in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes=10, image_size=32):
    return ResNetCIFAR(3, num_classes, image_size)


def resnet56(num_classes=10, image_size=32):
    return ResNetCIFAR(9, num_classes, image_size)


def resnet110(num_classes=10, image_size=32):
    return ResNetCIFAR(18, num_classes, image_size)
