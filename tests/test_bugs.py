"""One regression test per fixed defect; each failed before its fix."""

import json
from pathlib import Path

import pytest
import timm
import torch

import lfnnify
from tests.models import batch

ROOT = Path(__file__).resolve().parents[1]


def _update_norms(amp):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    net = lfnnify.convert(model, cuts=["1"], mode="lfnn", workers=4, leaders=0.5, num_classes=5,
                          example_input=batch(8)[:1])
    before = [p.detach().clone() for p in net.parameters()]
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), amp=amp, progress=False)
    trainer.train_step(batch(8, n=6), torch.tensor([0, 1, 2, 3, 4, 0]))
    return torch.stack([(p.detach() - b).norm() for p, b in zip(net.parameters(), before)])


def test_lfnn_mode_with_fp16_is_not_divided_by_the_loss_scale():
    # mode="lfnn" ran its backward unscaled while the fp16 gradient scaler unscaled the step: updates ~1/65536
    full, half = _update_norms(None), _update_norms("fp16")
    moved = full > 0
    ratio = (half[moved] / full[moved]).median()
    assert 0.8 < float(ratio) < 1.25, f"fp16 updates are {float(ratio):.2e} of full precision's"


@pytest.mark.xdist_group("torchrun-2")
def test_a_pipeline_checkpoint_rebuilds_a_torchvision_model_and_checks_its_fingerprint():
    # pipeline saves recorded zero shapes for other blocks' weights (rank-freed), and skipped the fingerprint
    from tests.launch import scenarios_run

    run = scenarios_run(2) / "2-torchvision"
    folder = run / "ckpt" / (run / "ckpt" / "CURRENT").read_text().split()[0]
    meta = json.loads((folder / "lfnnify.json").read_text())
    assert all(all(d > 0 for d in shape) for shape in meta["source_state_shapes"].values() if shape)
    assert len(meta["fingerprint"]) == 20  # 2 examples x 10 classes
    net = lfnnify.load(run / "ckpt")  # rebuilt by class and weight shapes, fingerprint checked
    assert type(net._source).__name__ == "ResNet"
    import torchvision

    with pytest.raises(lfnnify.CheckpointError, match="computes something else"):
        lfnnify.load(run / "ckpt", model=torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
                     .apply(lambda m: setattr(m, "eps", 0.5) if isinstance(m, torch.nn.BatchNorm2d) else None))


def test_resume_restores_the_cuda_random_state(monkeypatch):
    # resume saved only the CPU generator; on a GPU, dropout after a resume differed. No GPU here: the CUDA
    # calls are recorded, which is all this test can check on a CPU machine.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7, 8, 9], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    net = lfnnify.convert(timm.create_model("resnet18", num_classes=10), blocks=2, example_input=batch(32)[:1])
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), progress=False)
    state = trainer.state_dict()
    assert [t.tolist() for t in state["cuda_rng"]] == [[7, 8, 9]]
    trainer.load_state_dict(state)
    assert len(calls) == 1 and calls[0][0].tolist() == [7, 8, 9]


def test_the_command_line_reports_its_own_bugs_with_a_traceback(monkeypatch, capsys):
    # every ValueError/TypeError became a one-line "error", hiding lfnnify's own bugs
    from lfnnify.app import cli

    assert cli.main(["plan", "resnet18", "--input-size", "0"]) == 2  # the user's mistake: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input-size 0: give a positive square size" in err

    def broken(args):
        raise ValueError("an internal mistake")

    parser = cli.make_parser()
    parser._subparsers._group_actions[0].choices["plan"].set_defaults(func=broken)
    monkeypatch.setattr(cli, "make_parser", lambda: parser)
    assert cli.main(["plan", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal mistake" in err and "bug in lfnnify" in err


def test_coverage_counts_only_what_was_checked(tmp_path):
    # docs/coverage.md counted encoders and one-block models as "converted with isolated gradients"
    from benchmarks import zoo_coverage

    base = {"source": "timm", "family": "x", "fx_traceable": True, "stage": "done"}
    records = [
        {**base, "name": "a", "status": "ok", "k2": {"blocks": 2, "equal": True},
         "k4": {"blocks": 4, "equal": True, "isolated": True, "isolation_checked": "every block"}},
        {**base, "name": "b", "status": "ok", "k2": {"blocks": 2, "equal": True},
         "k4": {"blocks": 4, "equal": True, "isolated": True}},
        {**base, "name": "enc", "status": "ok", "no_classifier": True, "k2": {"blocks": 2, "equal": True},
         "k4": {"blocks": 4, "equal": True, "isolated": None}},
        {**base, "name": "one", "status": "ok", "k2": {"blocks": 1, "equal": None}, "k4": {"blocks": 1, "equal": None}},
        {**base, "name": "bad", "status": "timeout"},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = zoo_coverage.report(tmp_path / "r.jsonl", tmp_path / "doc.md")
    assert counts == {"checked": 5, "classifiers": 3, "converted": 2, "encoders": 1, "one_block": 1,
                      "every_block_isolated": 1}
    assert "**2** (66.7%) convert with identical outputs and isolated gradients" in (tmp_path / "doc.md").read_text()


def test_a_two_host_time_to_accuracy_sweep_on_an_unshaped_link_measures_its_split(tmp_path):
    # --rate unshaped with no split kept in the runs folder passed "unshaped" to plan(link=), which refused it: the
    # sweep stopped before its first run (the earlier unshaped sweeps had their split written in by hand)
    import argparse

    from benchmarks.time_to_accuracy.across_hosts import sweep_cuts

    args = argparse.Namespace(model="test_resnet", batch=8, rate="unshaped", methods=["lfnn_pipeline"])
    cuts, cuts4 = sweep_cuts(args, tmp_path)
    assert len(cuts) == 1 and cuts4 is None
    assert json.loads((tmp_path / "cuts.json").read_text())["measured_for"]["rate"] == "unshaped"
