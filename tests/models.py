"""Model builders shared by the tests: real timm/torchvision models at small input sizes."""

import timm
import torch
import torchvision

# (id, builder, input size, blocks): small inputs keep CPU CI fast; every model is a real architecture. Each is
# checked at one split: K=4 (the paper's) for the deep ones, K=2 for the others, so both split counts run on
# ResNets, VGGs, efficient/mobile nets and ViTs; benchmarks/zoo_coverage.py checks every model at both
EQUIVALENCE_MODELS = [
    ("timm-resnet18", lambda: timm.create_model("resnet18", num_classes=10), 32, 2),
    ("timm-resnet50", lambda: timm.create_model("resnet50", num_classes=10), 32, 2),
    ("timm-resnet101", lambda: timm.create_model("resnet101", num_classes=10), 32, 4),
    ("timm-resnet152", lambda: timm.create_model("resnet152", num_classes=10), 32, 4),
    ("timm-vgg19_bn", lambda: timm.create_model("vgg19_bn", num_classes=10), 32, 4),
    ("tv-resnet50", lambda: torchvision.models.resnet50(num_classes=10), 32, 4),
    ("tv-vgg19", lambda: torchvision.models.vgg19(num_classes=10), 32, 2),
    ("timm-convnext_atto", lambda: timm.create_model("convnext_atto", num_classes=10, drop_path_rate=0.1), 32, 4),
    (
        "timm-efficientnet_b0",
        lambda: timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.2, drop_path_rate=0.1),
        32,
        2,
    ),
    ("timm-regnetx_002", lambda: timm.create_model("regnetx_002", num_classes=10), 32, 2),
    ("timm-mobilenetv3_small_050", lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), 32, 4),
    ("timm-densenet121", lambda: timm.create_model("densenet121", num_classes=10), 32, 4),
    (
        "timm-vit_tiny",
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, drop_path_rate=0.1
        ),
        32,
        4,
    ),
    ("tv-vit_b_16", lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), 32, 2),
]

# models whose head dropout is functional, so train- and eval-mode graphs differ
FUNCTIONAL_DROPOUT = {"timm-efficientnet_b0"}


def batch(size, n=2, channels=3):
    return torch.randn(n, channels, size, size)
