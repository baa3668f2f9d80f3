"""search.train: exact accuracy, batch-norm statistics, augmentation, schedule, and distillation on tiny problems."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from search.data import DataSplits
from search.train import TeacherLogits, _lr_at, augment_batch, distill, evaluate, recalibrate_bn, train_teacher


def _tiny_data(n: int = 128, *, seed: int = 0) -> DataSplits:
    """4 classes of 1x6x6 images; the class is which quadrant is bright, so it is learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 6, 6, generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 3 * r:3 * r + 3, 3 * c:3 * c + 3] += 1.0
    half = n // 2
    return DataSplits(x[:half], y[:half], x[half:], y[half:], x[half:], y[half:], 4, (1, 6, 6), "tiny", half)


def _small_net(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 4),
    )


def test_evaluate_exact_accuracy_across_batches() -> None:
    logits = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])]  # argmax: 0 1 2 0 1 2 0 1 2 0
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, 0, 1])  # the last three are wrong
    model = nn.Flatten()
    model.train()
    assert evaluate(model, logits.view(10, 3, 1, 1), y, batch_size=3, device="cpu") == 0.7
    assert model.training  # the mode is restored


def test_evaluate_rejects_empty() -> None:
    with pytest.raises(ValueError, match="0 images"):
        evaluate(nn.Flatten(), torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long), device="cpu")


def test_recalibrate_bn_gives_batch_statistics() -> None:
    model = _small_net(0).eval()
    bn: nn.BatchNorm2d = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    x = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model[0](x)  # the first BN's input [N, C, H, W]
    recalibrate_bn(model, x, batches=2, batch_size=20, device="cpu")
    # momentum=None is a plain average of the per-batch statistics (var unbiased, as BatchNorm keeps it).
    halves = feats.split(20)
    mean = torch.stack([h.mean((0, 2, 3)) for h in halves]).mean(0)
    var = torch.stack([h.var((0, 2, 3), unbiased=True) for h in halves]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2 and not model.training


def test_recalibrate_bn_uses_only_the_first_batches() -> None:
    model = _small_net(0)
    x = torch.randn(30, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    recalibrate_bn(model, x, batches=1, batch_size=10, device="cpu")
    with torch.no_grad():
        expected = model[0](x[:10]).mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected, rtol=1e-5, atol=1e-6)


def test_augment_flip_only_returns_image_or_its_mirror() -> None:
    x = torch.randn(64, 2, 5, 5)
    out = augment_batch(x, pad=0, hflip=True, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64


def test_augment_crop_is_a_shifted_window_of_the_padded_image() -> None:
    x = torch.randn(32, 1, 6, 6)
    out = augment_batch(x, pad=2, hflip=False, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for n in range(32):
        found = [(i, j) for i in range(5) for j in range(5) if torch.equal(out[n], padded[n, :, i:i + 6, j:j + 6])]
        assert found, f"sample {n} is not a crop"
        shifts.add(found[0])
    assert len(shifts) > 5  # the offsets really vary


def test_lr_schedule_warmup_then_cosine() -> None:
    assert _lr_at(0, steps=100, lr=1.0, warmup=0.1) == pytest.approx(0.1)
    assert _lr_at(9, steps=100, lr=1.0, warmup=0.1) == pytest.approx(1.0)
    assert _lr_at(10, steps=100, lr=1.0, warmup=0.1) == pytest.approx(1.0)
    assert _lr_at(55, steps=100, lr=1.0, warmup=0.1) == pytest.approx(0.5)
    assert _lr_at(0, steps=10, lr=2.0, warmup=0.0) == pytest.approx(2.0)
    assert _lr_at(9, steps=10, lr=2.0, warmup=0.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_train_teacher_learns_tiny_problem() -> None:
    data = _tiny_data()
    model = _small_net(0)
    calls: list[tuple[int, int]] = []
    train_teacher(model, data, steps=60, batch_size=16, lr=0.1, device="cpu", seed=0,
                  progress=lambda s, n, loss: calls.append((s, n)))
    assert calls[0] == (1, 60) and calls[-1] == (60, 60) and not model.training
    assert evaluate(model, data.test_x, data.test_y, device="cpu") >= 0.95


def _kd_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, temperature: float) -> float:
    with torch.no_grad():
        s = F.log_softmax(student.eval()(x) / temperature, dim=1)
        t = F.log_softmax(teacher.eval()(x) / temperature, dim=1)
        return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_distill_moves_student_towards_teacher() -> None:
    data = _tiny_data()
    teacher = _small_net(1, width=16)
    train_teacher(teacher, data, steps=40, batch_size=16, lr=0.1, device="cpu", seed=0)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _small_net(2)
    before = _kd_loss(student, teacher, data.test_x, 4.0)
    result = distill(student, teacher, data, steps=60, batch_size=16, lr=0.05, alpha=1.0, device="cpu", seed=0)
    after = _kd_loss(student, teacher, data.test_x, 4.0)
    assert result["steps"] == 60 and result["stopped_early"] is False
    assert after < 0.2 * before
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())  # teacher untouched, BN included


def test_distill_is_reproducible_by_seed() -> None:
    data, teacher = _tiny_data(), _small_net(1)
    students = [_small_net(2), _small_net(2)]
    for s in students:
        distill(s, teacher, data, steps=5, batch_size=16, lr=0.05, device="cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(students[0].state_dict().values(), students[1].state_dict().values()))


def test_distill_should_stop() -> None:
    data = _tiny_data()
    seen: list[int] = []

    def stop(step: int, loss: float) -> bool:
        seen.append(step)
        return step == 3

    result = distill(_small_net(2), _small_net(1), data, steps=50, batch_size=16, lr=0.05, device="cpu", seed=0,
                     should_stop=stop)
    assert result["steps"] == 3 and result["stopped_early"] is True and seen == [1, 2, 3]
    assert math.isfinite(result["final_loss"])


def test_training_returns_the_weights_in_the_default_layout_even_when_stopped_by_an_error() -> None:
    """Training runs channels_last; the model it returns is laid out like one built or loaded here (a teacher
    trained in this process and one read from the cache must time alike at batch 1)."""
    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def layouts(model: nn.Module) -> list[bool]:
        return [p.is_contiguous() for p in model.parameters() if p.dim() == 4]

    data, teacher = _tiny_data(), net(0)
    train_teacher(teacher, data, steps=2, batch_size=16, lr=0.1, device="cpu", seed=0)
    assert layouts(teacher) == [True, True]
    student = net(1)

    def interrupted(step: int, total: int, loss: float) -> None:
        assert not student[2].weight.is_contiguous()  # channels_last while it trains
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, data, steps=5, batch_size=16, lr=0.05, device="cpu", seed=0, progress=interrupted)
    assert layouts(student) == [True, True]


def test_distill_raises_on_nan_loss() -> None:
    student = _small_net(2)
    with torch.no_grad():
        student[5].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss became nan at step 1/10"):
        distill(student, _small_net(1), _tiny_data(), steps=10, batch_size=16, lr=0.05, device="cpu", seed=0)


class _Counting(nn.Module):
    """Wraps a model and counts the images it has been run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.inner(x)


def test_teacher_logits_are_the_teachers_and_each_image_runs_once() -> None:
    data = _tiny_data()
    teacher = _Counting(_small_net(1)).eval()
    cache = TeacherLogits(teacher, data.train_x, device="cpu", batch_size=5)
    idx = torch.tensor([7, 3, 7, 60, 0])
    with torch.no_grad():
        expected = teacher.inner(data.train_x[idx])
    torch.testing.assert_close(cache(idx), expected, rtol=1e-5, atol=1e-6)
    assert teacher.images == 4 and cache.cached == 4  # 7 twice in one call, computed once
    again = torch.tensor([3, 0, 1])
    with torch.no_grad():
        expected = teacher.inner(data.train_x[again])  # the inner model: not counted
    torch.testing.assert_close(cache(again), expected, rtol=1e-5, atol=1e-6)
    assert teacher.images == 5 and cache.cached == 5  # only image 1 was new


def test_distill_with_cached_teacher_logits_matches_distill_without() -> None:
    data, teacher = _tiny_data(), _small_net(1)
    plain = _small_net(2)
    distill(plain, teacher, data, steps=12, batch_size=16, lr=0.05, device="cpu", seed=3)
    counting = _Counting(teacher)
    logits = TeacherLogits(counting, data.train_x, device="cpu")
    for _ in range(2):  # the second run finds every image cached
        student = _small_net(2)
        distill(student, teacher, data, steps=12, batch_size=16, lr=0.05, device="cpu", seed=3, teacher_logits=logits)
    assert counting.images == len(data.train_x)  # 12 steps of 16 cover the 64 images three times; computed once
    for a, b in zip(plain.state_dict().values(), student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_distill_refuses_cached_logits_for_augmented_or_other_images() -> None:
    data, teacher = _tiny_data(), _small_net(1)
    logits = TeacherLogits(teacher, data.train_x, device="cpu")
    with pytest.raises(ValueError, match="cannot serve augmented images"):
        distill(_small_net(2), teacher, data, steps=2, batch_size=16, lr=0.05, device="cpu", seed=0, augment=True,
                teacher_logits=logits)
    other = TeacherLogits(teacher, data.train_x.clone(), device="cpu")
    with pytest.raises(ValueError, match="other data"):
        distill(_small_net(2), teacher, data, steps=2, batch_size=16, lr=0.05, device="cpu", seed=0, teacher_logits=other)


@pytest.mark.parametrize("augment", [False, True])
def test_an_interrupted_distill_resumed_from_its_state_ends_with_the_same_weights(augment: bool) -> None:
    data = _tiny_data(96)  # 48 training images: batches of 20 start a new epoch every 2 steps
    if augment:  # a dataset with random crops, so the generator's state matters too
        data = dataclasses.replace(data, name="fashion-mnist")
    teacher = _small_net(0)
    train_teacher(teacher, data, steps=10, batch_size=16, lr=0.1, device="cpu", seed=0)
    kwargs = dict(steps=9, batch_size=20, lr=0.05, device="cpu", seed=3, augment=augment)

    whole = _small_net(1)
    distill(whole, teacher, data, **kwargs)

    saved: list[dict] = []

    class Stop(Exception):
        pass

    def keep(state: dict) -> None:
        saved.append({"model": {k: v.clone() for k, v in first.state_dict().items()}, "loop": state})
        if state["step"] == 4:
            raise Stop

    first = _small_net(1)
    with pytest.raises(Stop):
        distill(first, teacher, data, on_save=keep, save_every=2, **kwargs)
    assert [s["loop"]["step"] for s in saved] == [2, 4]

    resumed = _small_net(7)  # other initial weights: everything must come from the saved state
    resumed.load_state_dict(saved[-1]["model"])
    stats = distill(resumed, teacher, data, resume=saved[-1]["loop"], **kwargs)
    assert stats["steps"] == 9
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_precision_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.train import resolve_precision

    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_precision("auto", "cpu") == ("bf16" if amx else "fp32")
        assert resolve_precision("auto", torch.device("cuda")) == "fp32"  # not measured on a GPU: as before
        assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of .*'fp16'"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_bf16_fine_tune_runs_its_convolutions_in_bf16_and_keeps_fp32_weights_and_targets(precision: str) -> None:
    """Mixed precision: the student's convolutions output bf16 inside the loop, its weights and gradients stay
    fp32, the cached teacher logits (the targets) are fp32, and the loss still falls. fp32: nothing changes."""
    data = _tiny_data()
    teacher = _small_net(1, width=16)
    train_teacher(teacher, data, steps=40, batch_size=16, lr=0.1, device="cpu", seed=0, precision=precision)
    student = _small_net(2)
    seen: set[torch.dtype] = set()
    student[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training else None)
    logits = TeacherLogits(teacher, data.train_x, device="cpu")
    before = _kd_loss(student, teacher, data.test_x, 4.0)
    distill(student, teacher, data, steps=60, batch_size=16, lr=0.05, alpha=1.0, device="cpu", seed=0,
            teacher_logits=logits, precision=precision)
    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert logits.logits is not None and logits.logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(logits.logits[:5], teacher.eval()(data.train_x[:5]))  # fp32 teacher, not autocast
    assert _kd_loss(student, teacher, data.test_x, 4.0) < 0.2 * before
    assert evaluate(teacher, data.test_x, data.test_y, device="cpu") >= 0.95


def test_distill_refuses_an_unresolved_precision() -> None:
    with pytest.raises(ValueError, match=r"fp32 or bf16 here .*'auto'"):
        distill(_small_net(2), _small_net(1), _tiny_data(), steps=1, batch_size=16, lr=0.05, device="cpu", seed=0,
                precision="auto")
