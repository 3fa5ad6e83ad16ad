"""kdsweep's own optimiser (kdsweep/training/optimizer.py) updates parameters exactly as torch.optim with
loop.py's cosine LambdaLR does, to the last bit, and building it imports no torch._dynamo (start-up, issue 20)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from kdsweep.training.optimizer import Optimizer

TOTAL = 7


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def _reference(params, kind: str, lr: float, momentum: float, weight_decay: float, foreach: bool):
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        opt = cls(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, foreach=foreach)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / TOTAL)))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind,momentum,weight_decay", [
    ("sgd", 0.9, 5e-4), ("sgd", 0.0, 0.0), ("sgd", 0.8, 0.0),
    ("adam", 0.9, 5e-4), ("adam", 0.8, 0.0), ("adamw", 0.9, 0.05),
])
def test_updates_equal_torch_optim_to_the_last_bit(kind, momentum, weight_decay, foreach):
    ours_model, ref_model = _model(0), _model(0)
    ours = Optimizer(ours_model.parameters(), kind, 0.05, momentum, weight_decay, TOTAL)
    ref, sched = _reference(list(ref_model.parameters()), kind, 0.05, momentum, weight_decay, foreach)
    torch.manual_seed(1)
    for step in range(TOTAL):
        x = torch.randn(8, 5)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if step == 0:  # one parameter's first gradient comes a step after the others' (its buffer starts later)
                model[0].bias.grad = None
            if step == 2:  # a step where one parameter got no gradient: it is left alone, its count too
                model[2].bias.grad = None
        assert ours.lr == ref.param_groups[0]["lr"]
        ours.step()
        ref.step()
        sched.step()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b), (step, (a - b).abs().max())


def test_its_state_copies_into_another_model():
    """As `loop._copy_run` uses it: a copy of the model and of the optimiser's state steps as the original."""
    model = _model(0)
    opt = Optimizer(model.parameters(), "adam", 0.01, 0.9, 0.0, TOTAL)
    x = torch.randn(8, 5)
    model(x).sum().backward()
    opt.step()
    twin = _model(0)
    twin.load_state_dict(model.state_dict())
    twin_opt = Optimizer(twin.parameters(), "adam", 0.01, 0.9, 0.0, TOTAL)
    twin_opt.load_state_dict({"t": opt.state_dict()["t"], "state": {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in bufs.items()}
        for i, bufs in opt.state_dict()["state"].items()}})
    assert twin_opt.lr == opt.lr
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        Optimizer([torch.zeros(1, requires_grad=True)], "rmsprop", 0.1, 0.9, 0.0, TOTAL)


def test_training_a_student_imports_no_dynamo():
    """torch.optim's constructors import torch._dynamo (1.2 s on 2 cores); training does not need it."""
    code = ("import sys, torch\n"
            "from kdsweep.data.dispatch import load_data\n"
            "from kdsweep.models.factory import build_model\n"
            "from kdsweep.methods.registry import get_method\n"
            "from kdsweep.training.loop import Schedule, train_student\n"
            "d = load_data('digits', None, 200, 0, 0.2, torch.device('cpu'))\n"
            "s = build_model('digitnet_s', d.in_shape, d.num_classes)\n"
            "m = get_method('ce')({}, s.shapes(d.in_shape), None, 1)\n"
            "train_student(s, m, None, d, Schedule(1, 64, 0.05))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
