"""Classification metrics from a confusion matrix C (rows: true class, columns: predicted):
overall accuracy OA = trace/N, per-class accuracy (recall) C_ii / row_i, average accuracy AA =
mean over classes present, Cohen's kappa = (p_o - p_e) / (1 - p_e) with
p_e = sum_i row_i * col_i / N^2."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(cm: torch.Tensor) -> dict:
    cm = cm.double()
    n = cm.sum()
    if n == 0:
        raise ValueError("empty confusion matrix")
    rows, cols = cm.sum(1), cm.sum(0)
    diag = cm.diag()
    present = rows > 0
    per_class = torch.where(present, diag / rows.clamp_min(1), torch.full_like(diag, float("nan")))
    po = diag.sum() / n
    pe = (rows * cols).sum() / (n * n)
    kappa = (po - pe) / (1 - pe) if pe < 1 else torch.tensor(1.0, dtype=torch.float64)
    return {"oa": po.item(), "aa": per_class[present].mean().item(), "kappa": kappa.item(),
            "per_class": per_class.tolist(), "n": int(n.item())}
