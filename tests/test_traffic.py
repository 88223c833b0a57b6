"""What plan() says each cut and DDP send per step, checked against the tensors themselves."""

import pytest
import timm
import torch

import lfnnify


def test_each_cut_sends_its_activation_and_labels_and_ddp_its_ring_all_reduce():
    model = timm.create_model("resnet18", num_classes=10)
    plan = lfnnify.plan(model, blocks=3, example_input=torch.zeros(1, 3, 32, 32), batch_size=8, link="1gbit",
                        mode="replay", send_dtype=torch.bfloat16)
    net = lfnnify.convert(model, cuts=plan.cuts, example_input=torch.zeros(1, 3, 32, 32))
    h = torch.randn(8, 3, 32, 32)
    expected = []
    with torch.no_grad():
        for block in list(net.blocks)[:-1]:
            h = block(h)
            expected.append(h.to(torch.bfloat16).numel() * 2 + 8 * 8)  # bf16 activations, int64 labels
    t = plan.traffic
    assert t.cut_bytes == expected and t.backward and t.pipeline_bytes == 2 * max(expected)
    params = sum(p.numel() for p in model.parameters())
    assert t.ddp_bytes == int(2 * 2 / 3 * params * 4)  # each of 3 devices sends 2(K-1)/K of the gradients
    assert t.seconds(10**9 // 8) == pytest.approx(1.0)  # 1 Gbit at 1 Gbit/s
    text = str(plan)
    assert "traffic per step at batch 8, bfloat16 activations, link 1 Gbit/s" in text and "DDP on 3 devices" in text


def test_at_imagenet_size_an_early_cut_moves_more_than_ddp_and_the_plan_says_so():
    plan = lfnnify.plan(timm.create_model("resnet50"), cuts=["layer1"], example_input=torch.zeros(1, 3, 224, 224),
                        batch_size=256, send_dtype=torch.bfloat16)
    assert plan.traffic.busiest_one_way > plan.traffic.ddp_bytes
    assert "sends MORE than each DDP device" in str(plan)


def test_bad_link_and_batch():
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(lfnnify.ConfigError, match="link='fast'"):
        lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), link="fast")
    with pytest.raises(lfnnify.ConfigError, match="batch_size=0 must be an int >= 1"):
        lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), batch_size=0)
