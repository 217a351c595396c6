"""The hierarchical contrastive loss against brute-force references written with plain loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hivlp.losses import HierarchicalContrastiveLoss
from hivlp.model import HierarchicalHead

LEVELS = [4, 8, 16]


def reference_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float, ids: list[int]) -> float:
    """Symmetric InfoNCE with per-element loops; captions of the same image are never negatives."""
    n = img.shape[0]
    sim = [[float(img[i] @ txt[j]) * scale for j in range(n)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        keep = [j for j in range(n) if j == i or ids[j] != ids[i]]
        i2t += -sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in keep))
        t2i += -sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in keep))
    return 0.5 * (i2t / n + t2i / n)


def reference_total(img, txt, logit_scale, ids, levels, weights) -> float:
    scale = min(math.exp(logit_scale), 100.0)
    total = sum(weights)
    out = 0.0
    for d, w in zip(levels, weights):
        a = F.normalize(img[:, :d].double(), dim=-1)
        b = F.normalize(txt[:, :d].double(), dim=-1)
        out += w / total * reference_infonce(a, b, scale, ids)
    return out


def reference_hinge(img, txt, ids, margin) -> float:
    a, b = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    n = a.shape[0]
    s = (a @ b.t()).tolist()
    per_image = per_caption = 0.0
    for i in range(n):
        negs = [j for j in range(n) if ids[j] != ids[i]]
        per_image += max([max(0.0, margin + s[i][j] - s[i][i]) for j in negs], default=0.0)
        per_caption += max([max(0.0, margin + s[j][i] - s[i][i]) for j in negs], default=0.0)
    return per_image / n + per_caption / n


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    txt = img + 0.8 * torch.randn(8, 16, generator=g)  # correlated, so positives score higher
    return img, txt


@pytest.mark.parametrize("ids", [list(range(8)), [0, 0, 1, 2, 2, 2, 3, 4]])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_matches_brute_force_reference(batch, ids, weights):
    img, txt = batch
    loss_fn = HierarchicalContrastiveLoss(LEVELS, level_weights=weights)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    total, parts = loss_fn(img, txt, logit_scale, torch.tensor(ids))
    w = weights or [1.0] * len(LEVELS)
    assert total.item() == pytest.approx(reference_total(img, txt, logit_scale.item(), ids, LEVELS, w), rel=1e-5)
    for d in LEVELS:
        a, b = F.normalize(img[:, :d].double(), dim=-1), F.normalize(txt[:, :d].double(), dim=-1)
        assert parts[f"loss_d{d}"].item() == pytest.approx(reference_infonce(a, b, 1 / 0.07, ids), rel=1e-5)


def test_one_temperature_per_level(batch):
    """A [n_levels] logit_scale gives each level its own temperature; equal entries equal the scalar."""
    img, txt = batch
    ids = [0, 0, 1, 2, 2, 2, 3, 4]
    loss_fn = HierarchicalContrastiveLoss(LEVELS)
    temps = [0.02, 0.05, 0.1]
    total, parts = loss_fn(img, txt, torch.log(1 / torch.tensor(temps)), torch.tensor(ids))
    for d, t in zip(LEVELS, temps):
        a, b = F.normalize(img[:, :d].double(), dim=-1), F.normalize(txt[:, :d].double(), dim=-1)
        assert parts[f"loss_d{d}"].item() == pytest.approx(reference_infonce(a, b, 1 / t, ids), rel=1e-5)
    same = torch.full((len(LEVELS),), math.log(1 / 0.07))
    assert loss_fn(img, txt, same, torch.tensor(ids))[0].item() == pytest.approx(
        loss_fn(img, txt, same[0], torch.tensor(ids))[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="one per level"):
        loss_fn(img, txt, torch.zeros(2), torch.tensor(ids))


def test_logit_scale_is_clamped_at_100(batch):
    img, txt = batch
    loss_fn = HierarchicalContrastiveLoss(LEVELS)
    big, _ = loss_fn(img, txt, torch.tensor(math.log(1000.0)))
    at_cap, _ = loss_fn(img, txt, torch.tensor(math.log(100.0)))
    assert big.item() == pytest.approx(at_cap.item(), rel=1e-6)


def test_captions_of_the_same_image_are_not_negatives(batch):
    img, txt = batch
    img = img.clone()
    img[1] = img[0]  # rows 0 and 1: two captions of one image
    loss_fn = HierarchicalContrastiveLoss(LEVELS)
    scale = torch.tensor(math.log(1 / 0.05))
    masked, _ = loss_fn(img, txt, scale, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    as_negative, _ = loss_fn(img, txt, scale, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert masked.item() < as_negative.item()
    ids = [0, 0, 1, 2, 3, 4, 5, 6]
    assert masked.item() == pytest.approx(reference_total(img, txt, scale.item(), ids, LEVELS, [1.0] * 3), rel=1e-5)
    # No ids: every row is its own image.
    no_ids, _ = loss_fn(img, txt, scale)
    assert no_ids.item() == pytest.approx(as_negative.item(), rel=1e-6)


def test_gradients_reach_heads_and_temperature():
    torch.manual_seed(0)
    image_head, text_head = HierarchicalHead(12, 16, "mlp", hidden=8), HierarchicalHead(6, 16)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.05)))
    img_feats, txt_feats = torch.randn(6, 12), torch.randn(6, 6)
    loss_fn = HierarchicalContrastiveLoss(LEVELS, hard_negative_weight=0.5)
    total, _ = loss_fn(image_head(img_feats), text_head(txt_feats), logit_scale, torch.arange(6))
    total.backward()
    for p in [*image_head.parameters(), *text_head.parameters(), logit_scale]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_hard_negative_term():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(8, 16, generator=g)
    txt = img + 2.0 * torch.randn(8, 16, generator=g)  # noisy enough for margin violations
    ids = [0, 0, 1, 2, 2, 3, 4, 5]
    scale = torch.tensor(math.log(1 / 0.05))
    plain, parts0 = HierarchicalContrastiveLoss(LEVELS)(img, txt, scale, torch.tensor(ids))
    levels_only = sum(parts0[f"loss_d{d}"] for d in LEVELS) / len(LEVELS)
    assert plain.item() == pytest.approx(levels_only.item(), rel=1e-6)  # weight 0: no hinge in the total

    with_hard, parts = HierarchicalContrastiveLoss(LEVELS, hard_negative_weight=0.5, margin=0.2)(
        img, txt, scale, torch.tensor(ids)
    )
    hard = parts["loss_hard"].item()
    assert hard > 0
    assert hard == pytest.approx(reference_hinge(img, txt, ids, 0.2), rel=1e-5)
    assert with_hard.item() == pytest.approx(plain.item() + 0.5 * hard, rel=1e-6)


def test_hard_negative_term_on_every_level():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(8, 16, generator=g)
    txt = img + 2.0 * torch.randn(8, 16, generator=g)
    ids = [0, 0, 1, 2, 2, 3, 4, 5]
    scale = torch.tensor(math.log(1 / 0.05))
    weights = [3.0, 1.0, 1.0]
    plain, _ = HierarchicalContrastiveLoss(LEVELS, weights)(img, txt, scale, torch.tensor(ids))
    total, parts = HierarchicalContrastiveLoss(
        LEVELS, weights, hard_negative_weight=0.5, margin=0.2, hard_negative_levels="all"
    )(img, txt, scale, torch.tensor(ids))
    expected = sum(w / 5.0 * reference_hinge(img[:, :d], txt[:, :d], ids, 0.2) for w, d in zip(weights, LEVELS))
    full_only = reference_hinge(img, txt, ids, 0.2)
    assert parts["loss_hard"].item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - full_only) > 1e-3  # the lower levels really enter
    assert total.item() == pytest.approx(plain.item() + 0.5 * expected, rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hard_negative_levels"):
        HierarchicalContrastiveLoss(LEVELS, hard_negative_levels="low")
    with pytest.raises(ValueError, match="3 levels"):
        HierarchicalContrastiveLoss(LEVELS, level_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="fewer than level 16"):
        HierarchicalContrastiveLoss(LEVELS)(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0))


def test_distillation_term_is_a_kl_towards_the_full_level():
    from hivlp.losses import distillation, same_image_mask

    torch.manual_seed(0)
    img = torch.randn(16, 64, requires_grad=True)
    txt = torch.randn(16, 64)
    scale = torch.tensor(3.0)
    ids = torch.arange(16) // 2  # pairs of captions of the same image
    t0, p0 = HierarchicalContrastiveLoss([16, 64])(img, txt, scale, ids)
    t1, p1 = HierarchicalContrastiveLoss([16, 64], distill_weight=1.0)(img, txt, scale, ids)
    assert "loss_distill" not in p0 and p1["loss_distill"] > 0
    torch.testing.assert_close(t1, t0 + p1["loss_distill"])
    exclude = same_image_mask(ids, 16, img.device)
    full = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    low = F.normalize(img[:, :16], dim=-1) @ F.normalize(txt[:, :16], dim=-1).t()
    assert float(distillation(3 * full, 3 * full, exclude)) < 1e-6  # identical similarities: no KL
    # The teacher (full level) gets no gradient: only the student's similarities move the term.
    teacher = (3 * full).detach().requires_grad_(True)
    distillation(3 * low, teacher, exclude).backward()
    assert teacher.grad is None or float(teacher.grad.abs().sum()) == 0.0


def test_distillation_does_not_move_the_temperature():
    """The KD term must not lower its own loss by flattening both softmaxes through the temperature:
    the temperature's gradient is the same with and without it."""
    torch.manual_seed(0)
    img, txt = torch.randn(16, 64), torch.randn(16, 64)
    ids = torch.arange(16) // 2
    grads = []
    for kd in (0.0, 1.0):
        logit_scale = torch.tensor(3.0, requires_grad=True)
        total, parts = HierarchicalContrastiveLoss([16, 64], distill_weight=kd)(img, txt, logit_scale, ids)
        total.backward()
        grads.append(float(logit_scale.grad))
    assert parts["loss_distill"] > 0.01
    assert grads[1] == pytest.approx(grads[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Caption distillation towards a teacher text tower


def reference_caption_distillation(student, teacher, levels, tau) -> float:
    """Per caption i, KL(p_teacher(i, .) || p_student(i, .)) over the other captions j != i, written with
    loops; p(i, j) = softmax_j cos(i, j) / tau. Mean over captions, then over levels."""

    def cos(a, b) -> float:
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    n = student.shape[0]
    t = teacher.double()
    out = 0.0
    for d in levels:
        s = student[:, :d].double()
        level = 0.0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            t_exp = [math.exp(cos(t[i], t[j]) / tau) for j in others]
            s_exp = [math.exp(cos(s[i], s[j]) / tau) for j in others]
            tz, sz = sum(t_exp), sum(s_exp)
            level += sum((te / tz) * (math.log(te / tz) - math.log(se / sz)) for te, se in zip(t_exp, s_exp))
        out += level / n
    return out / len(levels)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_caption_distillation_matches_reference(batch, tau):
    from hivlp.losses import caption_distillation

    _, txt = batch
    teacher = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))  # another width than the student
    ours = caption_distillation(txt, teacher, LEVELS, tau)
    assert ours.item() == pytest.approx(reference_caption_distillation(txt, teacher, LEVELS, tau), rel=1e-4, abs=1e-6)
    assert ours.item() > 0
    # A student whose every level relates the captions as the teacher does has nothing to learn.
    same = teacher[:, :4].repeat(1, 4)  # each prefix 4, 8, 16 spans copies of the same 4-d vectors
    assert caption_distillation(same, teacher[:, :4], LEVELS, tau).item() == pytest.approx(0.0, abs=1e-5)


def test_teacher_term_in_the_total_and_gradients(batch):
    img, txt = batch
    txt = txt.clone().requires_grad_(True)
    teacher = torch.randn(8, 24, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    scale = torch.tensor(math.log(20.0))
    plain, _ = HierarchicalContrastiveLoss(LEVELS)(img, txt, scale)
    with_t, parts = HierarchicalContrastiveLoss(LEVELS, teacher_weight=0.7, teacher_temperature=0.1)(
        img, txt, scale, teacher_text=teacher)
    ref = reference_caption_distillation(txt.detach(), teacher.detach(), LEVELS, 0.1)
    assert parts["loss_teacher"].item() == pytest.approx(ref, rel=1e-4)
    assert (with_t - plain).item() == pytest.approx(0.7 * ref, rel=1e-4)
    with_t.backward()
    assert teacher.grad is None and txt.grad.abs().sum() > 0  # the teacher is a constant
    # Weight 0 or no teacher features: the term is absent.
    _, parts0 = HierarchicalContrastiveLoss(LEVELS)(img, txt, scale, teacher_text=teacher)
    assert "loss_teacher" not in parts0
