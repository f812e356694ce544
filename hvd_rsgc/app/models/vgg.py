"""VGG-19 with BatchNorm (Simonyan & Zisserman 2015, configuration E). The classifier is
adapted to the input size: after the five max-pools the feature map is image_size/32 on a side
(256 -> 8x8); an adaptive pool brings it to at most 7x7 (as torchvision does for 224) and the
two 4096-unit hidden layers are scaled down for small inputs (32 px -> 512 units, the usual
CIFAR variant) so that a 32-64 px smoke run stays CPU-sized."""
import torch.nn as nn

CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, num_classes=1000, image_size=224, cfg=CFG_E):
        super().__init__()
        if image_size < 32 or image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (>= 32) for VGG, got {image_size}")
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        side = min(7, image_size // 32)
        hidden = 4096 if image_size >= 128 else 512
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.classifier = nn.Sequential(
            nn.Linear(512 * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg19(num_classes=1000, image_size=224):
    return VGG(num_classes, image_size)
