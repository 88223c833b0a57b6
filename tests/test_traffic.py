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


def test_int8_sends_a_byte_per_value_and_a_float32_scale_per_channel():
    from lfnnify.pipeline.quantize import quantize

    model = timm.create_model("test_resnet", num_classes=10)
    plan = lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), batch_size=8,
                        send_dtype=torch.int8)
    net = lfnnify.convert(model, cuts=plan.cuts, example_input=torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        values, scales = quantize(net.blocks[0](torch.randn(8, 3, 32, 32)))  # what the pipeline's Link sends
    assert plan.traffic.cut_bytes == [values.numel() * values.element_size() + scales.numel() * 4 + 8 * 8]
    assert "int8 activations" in str(plan)
    with pytest.raises(lfnnify.ConfigError, match="send_dtype=torch.int16 must be None"):
        lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), batch_size=8, send_dtype=torch.int16)


def test_without_batch_size_the_traffic_is_for_the_example_inputs_batch():
    # plan(..., link=) with an example of 7 images and no batch_size= reports a step of 7, as its docstring says
    model = timm.create_model("test_resnet", num_classes=10)
    seven = lfnnify.plan(model, blocks=2, example_input=torch.zeros(7, 3, 32, 32), link="1gbit").traffic
    one = lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), link="1gbit").traffic
    assert seven.batch_size == 7 and one.batch_size == 1
    assert seven.cut_bytes == [7 * b for b in one.cut_bytes] and one.cut_bytes[0] > 8  # activations and labels


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


def _all_reduced_elements(model, hook, state, steps: int) -> int:
    """The elements DDP with ``hook`` really all-reduces in its last of ``steps`` steps: torch's own hook runs, in
    a one-process gloo group, and every tensor it hands to all_reduce is counted on its way through."""
    import gc

    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    # an in-memory store: no TCP server thread or port in the test process, which a later stray connection or the
    # group's end could reach from a native thread and abort the whole test worker
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    counted, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    wrapped = None
    try:
        dist.all_reduce = counting
        wrapped = DistributedDataParallel(model)
        wrapped.register_comm_hook(state, hook)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        for _ in range(steps):
            counted.clear()
            F.cross_entropy(wrapped(x), y).backward()
        return sum(counted)
    finally:
        dist.all_reduce = real
        # DDP (its reducer and the hook's state) goes before its process group: collected after it, during the next
        # call's DDP, it aborted this process once ("Fatal Python error: Aborted")
        del wrapped
        gc.collect()
        dist.destroy_process_group()


def test_what_the_plan_says_powersgd_sends_is_what_torchs_hook_all_reduces():
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    plan = lfnnify.plan(model, blocks=2, example_input=torch.zeros(1, 3, 32, 32), batch_size=64, link="100mbit")
    t = plan.traffic
    shapes = [tuple(p.shape) for p in model.parameters()]
    for rank in (1, 4):
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                            use_error_feedback=True, warm_start=True)
        elements = _all_reduced_elements(model, powerSGD_hook.powerSGD_hook, state, steps=3)  # compressing from step 3
        assert elements == lfnnify.surgery.traffic.powersgd_elements(shapes, rank)
        assert t.powersgd_bytes[rank] == elements * 4  # two devices: a ring all-reduce sends each byte once
    assert t.ddp_fp16_bytes == t.ddp_bytes // 2 and t.local_sgd_bytes == {4: t.ddp_bytes // 4, 16: t.ddp_bytes // 16}
    text = str(plan)
    assert "DDP with PowerSGD (error feedback, once compressing): rank 1 " in text
    # at 32 px resnet18's one cut carries more than PowerSGD at rank 1 all-reduces: the plan says which baseline wins
    assert t.busiest_one_way > t.powersgd_bytes[1]
    assert "the pipeline's busiest cut sends more than DDP + PowerSGD rank 1" in text
