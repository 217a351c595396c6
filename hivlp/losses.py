"""The hierarchical contrastive objective: symmetric InfoNCE at every nested level, weighted.

A batch holds B (image, caption) pairs; several rows may show the same image (several of its
captions). Such rows are not negatives of each other: their off-diagonal entries are masked out of
both softmaxes (image->text and text->image) and of the hard-negative hinge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0


def same_image_mask(image_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """[B, B] bool: True where rows i != j show the same image (to be excluded from the negatives)."""
    if image_ids is None:
        return torch.zeros(batch_size, batch_size, dtype=torch.bool, device=device)
    ids = image_ids.to(device)
    same = ids[:, None] == ids[None, :]
    return same & ~torch.eye(batch_size, dtype=torch.bool, device=device)


def symmetric_infonce(logits: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy with the diagonal as targets."""
    logits = logits.masked_fill(exclude, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def max_violation_hinge(sim: torch.Tensor, exclude: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++ loss: hinge on the hardest negative caption per image and hardest negative image per caption."""
    pos = sim.diagonal()
    off = exclude | torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    cost_caption = (margin + sim - pos[:, None]).clamp(min=0).masked_fill(off, 0.0)  # row i: image i
    cost_image = (margin + sim - pos[None, :]).clamp(min=0).masked_fill(off, 0.0)  # column j: caption j
    return cost_caption.max(dim=1).values.mean() + cost_image.max(dim=0).values.mean()


def distillation(student: torch.Tensor, teacher: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the row and column softmaxes; the teacher (full level) gets no gradient."""
    student = student.masked_fill(exclude, float("-inf"))
    teacher = teacher.detach().masked_fill(exclude, float("-inf"))
    loss = 0.0
    for s_logits, t_logits in ((student, teacher), (student.t(), teacher.t())):
        t_prob = t_logits.softmax(dim=-1)
        kl = t_prob * (t_logits.log_softmax(dim=-1) - s_logits.log_softmax(dim=-1))
        loss = loss + kl.nan_to_num(0.0).sum(dim=-1).mean()
    return 0.5 * loss


def caption_distillation(
    student: torch.Tensor, teacher: torch.Tensor, levels: Sequence[int], temperature: float,
) -> torch.Tensor:
    """Pull the student's caption embeddings at every level towards a teacher text tower's.

    The two live in different spaces (a d-dim level vs the teacher's own features), so what is matched is
    how each caption relates to the other captions of the batch: for every caption i, the softmax over
    j != i of cosine(i, j) / temperature, KL(teacher || student), averaged over captions and levels. The
    teacher features are constants (no gradient); self-similarity is left out of both softmaxes.
    """
    n = student.shape[0]
    if teacher.shape[0] != n:
        raise ValueError(f"teacher features have {teacher.shape[0]} rows for {n} captions")
    self_pair = torch.eye(n, dtype=torch.bool, device=student.device)
    t = F.normalize(teacher.detach().float(), dim=-1)
    t_logits = (t @ t.t() / temperature).masked_fill(self_pair, float("-inf"))
    t_prob = t_logits.softmax(dim=-1)
    t_log = t_logits.log_softmax(dim=-1)
    total = student.new_zeros(())
    for dim in levels:
        s = F.normalize(student[:, :dim], dim=-1)
        s_log = (s @ s.t() / temperature).masked_fill(self_pair, float("-inf")).log_softmax(dim=-1)
        kl = (t_prob * (t_log - s_log)).masked_fill(self_pair, 0.0)
        total = total + kl.sum(dim=-1).mean()
    return total / len(levels)


class HierarchicalContrastiveLoss(nn.Module):
    """Weighted multi-level symmetric InfoNCE, plus an optional hardest-negative hinge (on the full level,
    or on every level with the level weights: ``hard_negative_levels="all"``) and an optional
    self-distillation of every lower level towards the full level's similarities."""

    def __init__(
        self,
        levels: Sequence[int],
        level_weights: Sequence[float] | None = None,
        hard_negative_weight: float = 0.0,
        margin: float = 0.2,
        distill_weight: float = 0.0,
        hard_negative_levels: str = "full",
        teacher_weight: float = 0.0,
        teacher_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.levels = list(levels)
        if not self.levels:
            raise ValueError("levels: at least one level is needed")
        weights = [1.0] * len(self.levels) if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != len(self.levels):
            raise ValueError(f"level_weights: {len(weights)} weights for {len(self.levels)} levels")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"level_weights must be >= 0 with a positive sum, got {weights}")
        total = sum(weights)
        self.level_weights = [w / total for w in weights]
        self.hard_negative_weight = float(hard_negative_weight)
        self.margin = float(margin)
        if hard_negative_levels not in ("full", "all"):
            raise ValueError(f"hard_negative_levels: expected 'full' or 'all', got {hard_negative_levels!r}")
        self.hard_negative_levels = hard_negative_levels
        self.distill_weight = float(distill_weight)
        self.teacher_weight = float(teacher_weight)
        self.teacher_temperature = float(teacher_temperature)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {"loss_d<dim>": per-level InfoNCE, "loss_hard": hinge, "loss_teacher": caption
        distillation when `teacher_text` (teacher features of the batch's captions) is given}); parts are
        detached."""
        if image_emb.shape != text_emb.shape:
            raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings differ")
        if image_emb.shape[-1] < self.levels[-1]:
            raise ValueError(f"embeddings have {image_emb.shape[-1]} dims, fewer than level {self.levels[-1]}")
        batch = image_emb.shape[0]
        exclude = same_image_mask(image_ids, batch, image_emb.device)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if scale.dim() == 0:
            scales = [scale] * len(self.levels)
        elif scale.shape == (len(self.levels),):
            scales = list(scale.unbind())
        else:
            raise ValueError(f"logit_scale must be a scalar or one per level ({len(self.levels)}), got {tuple(scale.shape)}")
        parts: dict[str, torch.Tensor] = {}
        total = image_emb.new_zeros(())
        sims = []
        for dim, weight, s in zip(self.levels, self.level_weights, scales):
            img = F.normalize(image_emb[:, :dim], dim=-1)
            txt = F.normalize(text_emb[:, :dim], dim=-1)
            sim = img @ txt.t()
            sims.append(sim)
            loss = symmetric_infonce(s * sim, exclude)
            parts[f"loss_d{dim}"] = loss.detach()
            total = total + weight * loss
        if self.distill_weight > 0 and len(sims) > 1:
            # Temperatures are detached here: through them KL could be zeroed by flattening both
            # distributions (temperature up), which would undo the contrastive terms.
            kd = sum(distillation(s.detach() * sim_l, scales[-1].detach() * sims[-1], exclude)
                     for s, sim_l in zip(scales, sims[:-1])) / (len(sims) - 1)
            parts["loss_distill"] = kd.detach()
            total = total + self.distill_weight * kd
        if self.hard_negative_levels == "all":
            hard = sum(w * max_violation_hinge(sim_l, exclude, self.margin)
                       for w, sim_l in zip(self.level_weights, sims))
        else:
            hard = max_violation_hinge(sims[-1], exclude, self.margin)
        if teacher_text is not None and self.teacher_weight > 0:
            kd_t = caption_distillation(text_emb, teacher_text, self.levels, self.teacher_temperature)
            parts["loss_teacher"] = kd_t.detach()
            total = total + self.teacher_weight * kd_t
        parts["loss_hard"] = hard.detach()
        if self.hard_negative_weight > 0:
            total = total + self.hard_negative_weight * hard
        return total, parts
