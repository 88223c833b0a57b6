"""A representative sample of the zoo sweep in CI: one model per family, with the sweep's own check.

The full sweep is `benchmarks/zoo_coverage.py`; its committed results are in docs/coverage.md.
"""

import warnings

import pytest

from benchmarks import zoo_coverage as zoo

# families not covered by test_convert.py, chosen for the known traps: distillation tokens (deit, levit),
# SAME padding (tf_*), window attention (swin), in-place ops (nfnet), aux outputs (torchvision googlenet),
# multi-branch stages (dla, hrnet), token mixers (mixer, poolformer)
SAMPLE = [
    ("deit_tiny_distilled_patch16_224", "timm"),
    ("levit_128s", "timm"),
    ("tf_efficientnet_b0", "timm"),
    ("swin_tiny_patch4_window7_224", "timm"),
    ("nfnet_l0", "timm"),
    ("dla34", "timm"),
    ("ghostnet_100", "timm"),
    ("mixer_s32_224", "timm"),
    ("poolformer_s12", "timm"),
    ("inception_v3", "timm"),
    ("googlenet", "torchvision"),
    ("mobilenet_v3_small", "torchvision"),
]


@pytest.mark.parametrize("name,source", SAMPLE, ids=[f"{s}-{n}" for n, s in SAMPLE])
def test_zoo_sample_converts_with_identical_outputs(name, source):
    record = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train/eval graph and fallback warnings are recorded, not errors
        zoo.check_model(name, source, 96, record)  # the sweep's cap; inception needs more than 64 px
    assert record["status"] == "ok", record
    assert record["k2"]["equal"] and record["k4"]["equal"] and record["k4"]["isolated"]
