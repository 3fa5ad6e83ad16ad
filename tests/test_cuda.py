"""The CUDA path. Each test skips where there is no CUDA device; `benchmarks/gpu.sh` runs them on the first GPU.

CI has no GPU: these are written against the CUDA API but have only ever been run where one
was lent (see docs/performance.md for what was measured, and when).
"""

from __future__ import annotations

import pytest
import torch

from kdsweep.data.builtin import Augment, RawData, make_synthetic
from kdsweep.data.device_data import DeviceData
from kdsweep.methods.base import SampleIndex
from kdsweep.methods.registry import METHODS
from kdsweep.models.factory import build_model
from kdsweep.training.devices import Accel, frozen_copy, teacher_dtype
from kdsweep.training.loop import Lockstep, Member, Schedule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
IN_SHAPE, CLASSES = (3, 32, 32), 10


def _data(device, n=512):
    x, y = make_synthetic(n + 64, seed=0)
    raw = RawData(x[:n], y[:n], x[n:], y[n:], (0.5,) * 3, (0.25,) * 3, CLASSES, Augment(pad=4, flip=True))
    return DeviceData(raw, 0, 0.1, device)


def test_frozen_copy_casts_once_and_keeps_the_original():
    # CPU-checkable half of the bf16 teacher: the copy holds bf16 weights, the study's teacher stays fp32.
    torch.manual_seed(0)
    t = build_model("digitnet_l", (1, 8, 8), CLASSES).eval()
    c = frozen_copy(t, torch.bfloat16)
    assert {p.dtype for p in c.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in t.parameters()} == {torch.float32}
    assert frozen_copy(t, torch.float32) is t  # nothing to cast: no copy
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = t(x).float(), c(x).float()
    assert torch.allclose(ref, got, atol=0.05, rtol=0.05)
    assert teacher_dtype(torch.device("cpu")) == torch.float32 and teacher_dtype(torch.device("cuda")) == torch.bfloat16


@cuda
def test_resolve_device_turns_on_cudnn_autotuning():
    from kdsweep.training.devices import resolve_device

    torch.backends.cudnn.benchmark = False
    assert resolve_device("cuda").type == "cuda"
    assert torch.backends.cudnn.benchmark


def _one_member(name, device):
    """A one-member group of `name` (resnet18 -> smallnet) with its first step taken, and 3 more batches ready."""
    data = _data(device)
    torch.manual_seed(0)
    teacher = build_model("resnet18", IN_SHAPE, CLASSES).to(device).eval().requires_grad_(False)
    student = build_model("smallnet", IN_SHAPE, CLASSES)
    cls = METHODS[name]
    method = cls({k: v.default for k, v in cls.space.items()}, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), 2)
    group = Lockstep([Member(student, method, Schedule(2, 64, 0.05))], teacher, data, accel=Accel())
    (run,) = group.runs
    batches = [(x, y, ids) for x, y, ids in data.epoch(0, 64, index=True)][:4]
    feeds = [group.feed(i, x, ids) if group.feed is not None else None for i, (x, _, ids) in enumerate(batches)]
    run.begin_epoch()
    run.step(batches[0][0], batches[0][1], feeds[0], 1, SampleIndex(batches[0][2], data.n_train))  # first use: lazy state
    return run, [(x, y, t_out, SampleIndex(ids, data.n_train)) for (x, y, ids), t_out in zip(batches[1:], feeds[1:])]


@cuda
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_step_never_waits_for_the_gpu(name):
    """sync debug mode 'error' raises on any host-device synchronisation inside a training step."""
    run, steps = _one_member(name, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, t_out, index in steps:
            run.step(x, y, t_out, 1, index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@cuda
def test_the_teacher_runs_in_bf16_weights():
    device = torch.device("cuda")
    data = _data(device)
    teacher = build_model("resnet18", IN_SHAPE, CLASSES).to(device).eval().requires_grad_(False)
    student = build_model("smallnet", IN_SHAPE, CLASSES)
    cls = METHODS["vanilla_kd"]
    method = cls({k: v.default for k, v in cls.space.items()}, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), 1)
    group = Lockstep([Member(student, method, Schedule(1, 64, 0.05))], teacher, data, accel=Accel())
    x, _, ids = next(iter(data.epoch(0, 64, index=True)))
    out = group.feed(0, x, ids)
    assert out.logits.dtype == torch.bfloat16
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}  # the study's teacher itself is untouched


@cuda
def test_a_short_study_runs_on_cuda(kdsweep):
    code, out, err = kdsweep("study", "vanilla_kd", "--dataset", "digits", "--trials", "2", "--epochs", "2",
                             "--teacher-epochs", "2", "--device", "cuda", "--parallel", "2")
    assert code == 0, err
    assert "(2 trained" in out, out


def _compiled_fused_group(device):
    """Two vanilla_kd members (resnet18 -> smallnet) fused, their step compiled as `--compile` compiles it, one epoch
    trained."""
    data = _data(device)
    torch.manual_seed(0)
    teacher = build_model("resnet18", IN_SHAPE, CLASSES).to(device).eval().requires_grad_(False)
    cls = METHODS["vanilla_kd"]
    members = []
    for lr in (0.05, 0.1):
        student = build_model("smallnet", IN_SHAPE, CLASSES)
        method = cls({k: v.default for k, v in cls.space.items()}, student.shapes(IN_SHAPE), teacher.shapes(IN_SHAPE), 1)
        members.append(Member(student, method, Schedule(1, 64, lr)))
    group = Lockstep(members, teacher, data, accel=Accel(fused=True, compile=True))
    group.epoch()
    return group


@cuda
def test_the_compiled_fused_step_is_captured_as_a_cuda_graph():
    """On CUDA `--compile` compiles the fused step with mode reduce-overhead, which captures it as a CUDA graph
    unless inductor finds a reason not to (a host sync, a CPU tensor among the inputs, a dynamic shape); each
    capture it skips is counted in counters["inductor"]["cudagraph_skips"] and its reason logged. The counters
    are printed, so benchmarks/gpu.sh's log says what happened."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    group = _compiled_fused_group(torch.device("cuda"))
    print("inductor counters:", dict(counters["inductor"]))
    assert len(group.groups) == 1 and group.fused_members == 2, group.notes
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
