"""Training losses of the single-stage detector: softmax + OHEM (MultiBoxLoss) and sigmoid focal loss.

Both take the model's outputs dict and the list of per-image targets, match anchors to ground truth
for the whole batch (layers.matcher), and return named terms ``{"loss_cls", "loss_box"}``, computed in
float32 even under autocast. Both terms are normalised by the number of positive anchors in the batch
(at least 1), so an image's weight grows with its number of objects, as in SSD and RetinaNet.
"""

import logging
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.atss import atss_match
from layers.box_coder import BoxCoder
from layers.matcher import BACKGROUND, match_anchors, pad_targets

# How anchors become positives: fixed IoU thresholds (match_anchors) or adaptive (ATSS).
MATCHERS = ("iou", "atss")

logger = logging.getLogger(__name__)


def ohem_negative_mask(
    bg_loss: Tensor, negative_mask: Tensor, num_pos: Tensor, neg_pos_ratio: float
) -> Tensor:
    """Online hard example mining: the hardest negatives of each image.

    Image i keeps ``min(neg_pos_ratio * max(num_pos[i], 1), number of negatives of image i)`` negatives,
    those with the highest background loss. An image without positives (no gt, or only ignore regions)
    still contributes ``neg_pos_ratio`` hard negatives: SSD's rule would give it none, which wastes the
    gt-free images that exist to teach the model what is not an object.

    Args:
        bg_loss (Tensor[N, A]): loss of calling the anchor background, -log p_bg (no gradient needed).
        negative_mask (Tensor[N, A] bool): anchors that may be negatives (BACKGROUND, not IGNORE).
        num_pos (Tensor[N] int): positives per image.
        neg_pos_ratio: negatives per positive.

    Returns:
        Tensor[N, A] bool: the selected negatives (a subset of negative_mask).
    """
    num_available = negative_mask.sum(dim=1)
    num_neg = torch.minimum((neg_pos_ratio * num_pos.clamp(min=1)).long(), num_available)  # [N]
    # One sort for the batch: non-negatives get -inf so they rank after every negative and, because
    # num_neg <= num_available, are never selected.
    masked_loss = bg_loss.detach().float().masked_fill(~negative_mask, float("-inf"))
    order = masked_loss.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks < num_neg[:, None]


class _AnchorLoss(nn.Module):
    """Matching and the box term shared by both losses."""

    def __init__(
        self,
        box_coder: BoxCoder,
        positive_threshold: float,
        negative_threshold: float,
        smooth_l1_beta: float,
        best_anchor_match: str = "ties",
        matcher: str = "iou",
        atss_topk: int = 9,
    ):
        super().__init__()
        self.best_anchor_match = best_anchor_match  # see layers.matcher.match_anchors
        if matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
        self.matcher = matcher  # "iou": match_anchors' fixed thresholds; "atss": layers.atss.atss_match
        self.atss_topk = atss_topk
        if negative_threshold > positive_threshold:
            raise ValueError(
                f"negative_threshold {negative_threshold} > positive_threshold {positive_threshold}"
            )
        self.box_coder = box_coder
        self.positive_threshold = positive_threshold
        self.negative_threshold = negative_threshold
        self.smooth_l1_beta = smooth_l1_beta

    def label_anchors(
        self, anchors: Tensor, targets: List[Dict], num_anchors_per_level: List[int] | None = None
    ) -> Dict[str, Tensor]:
        """matched_idxs [N, A] (see match_anchors), gt_labels_per_anchor [N, A] (-1 unless positive) and
        gt_boxes_per_anchor [N, A, 4] (the matched gt box; meaningless unless positive).
        ``num_anchors_per_level`` (A_l per level) is needed by the ATSS matcher only."""
        gt_boxes, gt_labels, gt_valid, gt_ignore = pad_targets(targets, anchors.device)
        if self.matcher == "atss":
            if num_anchors_per_level is None:
                raise ValueError("the ATSS matcher needs the model's num_anchors_per_level")
            matched_idxs = atss_match(
                anchors,
                num_anchors_per_level,
                gt_boxes,
                gt_valid,
                gt_ignore,
                self.atss_topk,
                ignore_threshold=self.negative_threshold,
            )
        else:
            matched_idxs = match_anchors(
                anchors,
                gt_boxes,
                gt_valid,
                gt_ignore,
                self.positive_threshold,
                self.negative_threshold,
                allow_low_quality=True,
                best_anchor_match=self.best_anchor_match,
            )
        positive = matched_idxs >= 0
        idx = matched_idxs.clamp(min=0)
        if gt_boxes.shape[1] == 0:  # no gt in the whole batch: nothing to gather from
            gt_labels_per_anchor = torch.full_like(matched_idxs, -1)
            gt_boxes_per_anchor = anchors.new_zeros(matched_idxs.shape + (4,))
        else:
            gt_labels_per_anchor = torch.where(positive, gt_labels.gather(1, idx), -1)
            gt_boxes_per_anchor = gt_boxes.gather(1, idx[..., None].expand(-1, -1, 4))
        return {
            "matched_idxs": matched_idxs,
            "gt_labels_per_anchor": gt_labels_per_anchor,
            "gt_boxes_per_anchor": gt_boxes_per_anchor,
        }

    def box_loss(
        self, pred_box_deltas: Tensor, anchors: Tensor, gt_boxes_per_anchor: Tensor, positive: Tensor
    ) -> Tensor:
        """Smooth L1 summed over the positives' 4 deltas (not normalised)."""
        pos_image, pos_anchor = positive.nonzero(as_tuple=True)
        target_deltas = self.box_coder.encode(gt_boxes_per_anchor[pos_image, pos_anchor], anchors[pos_anchor])
        return F.smooth_l1_loss(
            pred_box_deltas[pos_image, pos_anchor].float(),
            target_deltas,
            beta=self.smooth_l1_beta,
            reduction="sum",
        )


class MultiBoxLoss(_AnchorLoss):
    """Softmax cross-entropy over K + 1 classes with online hard negative mining, plus smooth L1 boxes.

    Args:
        box_coder: encodes the regression targets.
        positive_threshold, negative_threshold: matching IoUs (layers.matcher.match_anchors); equal by
            default, so there is no ignore band.
        neg_pos_ratio: hard negatives kept per positive, per image (see ``ohem_negative_mask``).
        smooth_l1_beta: transition point of the smooth L1 box loss.

    Inputs (forward):
        outputs: pred_logits (Tensor[N, A, K + 1], column 0 = background), pred_box_deltas (Tensor[N, A, 4]),
            anchors (Tensor[A, 4], xyxy input px).
        targets: per image boxes (Tensor[G, 4] xyxy input px), labels (Tensor[G], 0..K-1 or -1), optional
            difficult / iscrowd. Label l trains logit column l + 1.

    Returns:
        loss_cls: CE summed over positives and the mined negatives / max(total positives, 1).
        loss_box: smooth L1 summed over positives / max(total positives, 1).
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        positive_threshold: float = 0.5,
        negative_threshold: float = 0.5,
        neg_pos_ratio: float = 3,
        smooth_l1_beta: float = 1.0,
        best_anchor_match: str = "ties",
        matcher: str = "iou",
        atss_topk: int = 9,
    ):
        super().__init__(
            box_coder,
            positive_threshold,
            negative_threshold,
            smooth_l1_beta,
            best_anchor_match,
            matcher,
            atss_topk,
        )
        self.neg_pos_ratio = neg_pos_ratio

    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict]) -> Dict[str, Tensor]:
        pred_logits, anchors = outputs["pred_logits"], outputs["anchors"]
        with torch.no_grad():
            labelled = self.label_anchors(anchors, targets, outputs.get("num_anchors_per_level"))
        matched_idxs = labelled["matched_idxs"]
        positive = matched_idxs >= 0
        negative = matched_idxs == BACKGROUND
        num_pos_per_image = positive.sum(dim=1)
        normaliser = num_pos_per_image.sum().clamp(min=1).float()

        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            logits = pred_logits.float()
            num_images, num_anchors, num_columns = logits.shape
            # Class per anchor: 0 for background (and ignore, whose loss is never used), l + 1 for label l.
            cls_targets = (labelled["gt_labels_per_anchor"] + 1).clamp(min=0)
            ce = F.cross_entropy(logits.reshape(-1, num_columns), cls_targets.reshape(-1), reduction="none")
            ce = ce.reshape(num_images, num_anchors)
            # For BACKGROUND anchors the CE above is exactly -log p_bg, the mining score.
            hard_negative = ohem_negative_mask(ce.detach(), negative, num_pos_per_image, self.neg_pos_ratio)
            # where() instead of boolean indexing: no host sync for the number of selected anchors.
            loss_cls = torch.where(positive | hard_negative, ce, 0.0).sum() / normaliser
            loss_box = (
                self.box_loss(outputs["pred_box_deltas"], anchors, labelled["gt_boxes_per_anchor"], positive)
                / normaliser
            )
        return {"loss_cls": loss_cls, "loss_box": loss_box}


def sigmoid_focal_loss_sum(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal loss (Lin et al. 2017) summed over all elements, as torchvision.ops.sigmoid_focal_loss.

    Args:
        logits (Tensor[M, K]), targets (Tensor[M, K] float, 0 or 1). alpha < 0 disables the weighting.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


# Rows per chunk: [rows, K] temporaries stay a few MB, so they are served from the allocator's free
# memory instead of fresh pages (on CPU, first-touch page faults cost more than the arithmetic).
_CHUNK_ROWS = 8192


def _softplus(x: Tensor, out: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20) written into ``out``."""
    return torch._C._nn.softplus(x, 1, 20, out=out)


class _NegativeFocalSum(torch.autograd.Function):
    """sum over rows r with weight w_r of sum_k p^gamma * softplus(x)  (p = sigmoid(x)), chunked.

    Every (anchor, class) pair scored as a negative: its focal term is (1 - alpha) * p^gamma * -log(1 - p),
    and -log(1 - p) = softplus(x). With s = softplus(x), ds/dx = p and dp/dx = p (1 - p):

        d/dx [p^gamma * s] = gamma p^(gamma - 1) * p (1 - p) * s + p^gamma * p
                           = p^gamma * (gamma * (1 - p) * s + p),

    which backward recomputes chunk by chunk from the logits: nothing of size [M, K] is saved but the
    input itself, and both passes write their per-chunk values into two [rows, K] buffers reused across
    chunks (plus, in backward, the [M, K] gradient, which is the output). tests/test_losses.py checks
    the gradient against autograd through torchvision's sigmoid_focal_loss.
    """

    @staticmethod
    def forward(ctx, logits, row_weight, gamma):  # logits [M, K] float32, row_weight [M] float32
        rows = max(1, min(_CHUNK_ROWS, logits.shape[0]))
        p_buf, s_buf = logits.new_empty((rows, logits.shape[1])), logits.new_empty((rows, logits.shape[1]))
        total = logits.new_zeros(())
        for x, w in zip(logits.split(rows), row_weight.split(rows)):
            m = x.shape[0]
            p = torch.sigmoid(x, out=p_buf[:m])
            total += p.pow_(gamma).mul_(_softplus(x, s_buf[:m])).sum(dim=1).dot(w)
        ctx.save_for_backward(logits, row_weight)
        ctx.gamma = gamma
        return total

    @staticmethod
    def backward(ctx, grad_output):
        logits, row_weight = ctx.saved_tensors
        gamma = ctx.gamma
        rows = max(1, min(_CHUNK_ROWS, logits.shape[0]))
        p_buf, s_buf = logits.new_empty((rows, logits.shape[1])), logits.new_empty((rows, logits.shape[1]))
        grad = torch.empty_like(logits)
        for x, w, g in zip(logits.split(rows), row_weight.split(rows), grad.split(rows)):
            m = x.shape[0]
            p = torch.sigmoid(x, out=p_buf[:m])
            t = _softplus(x, s_buf[:m])
            # g = p^gamma * ((1 - p) * s * gamma + p) * w * grad_output; 1 - p is formed in g itself.
            t.mul_(torch.neg(p, out=g).add_(1)).mul_(gamma).add_(p)
            torch.mul(p.pow_(gamma), t, out=g)
            g.mul_((w * grad_output)[:, None])
        return grad, None, None


class FocalLoss(_AnchorLoss):
    """Sigmoid focal loss over K classes (RetinaNet), plus smooth L1 boxes.

    Args:
        box_coder, positive_threshold, negative_threshold (anchors with IoU in between are ignored),
        alpha, gamma: focal loss parameters; smooth_l1_beta: box loss transition point.

    Inputs as MultiBoxLoss, except pred_logits has K columns (label l -> column l).

    Returns:
        loss_cls: focal loss summed over all classes of the non-ignored anchors / max(total positives, 1).
        loss_box: smooth L1 summed over positives / max(total positives, 1).
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        positive_threshold: float = 0.5,
        negative_threshold: float = 0.4,
        alpha: float = 0.25,
        gamma: float = 2.0,
        smooth_l1_beta: float = 1.0 / 9,
        best_anchor_match: str = "ties",
        matcher: str = "iou",
        atss_topk: int = 9,
    ):
        super().__init__(
            box_coder,
            positive_threshold,
            negative_threshold,
            smooth_l1_beta,
            best_anchor_match,
            matcher,
            atss_topk,
        )
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict]) -> Dict[str, Tensor]:
        pred_logits, anchors = outputs["pred_logits"], outputs["anchors"]
        with torch.no_grad():
            labelled = self.label_anchors(anchors, targets, outputs.get("num_anchors_per_level"))
        matched_idxs = labelled["matched_idxs"]
        positive = matched_idxs >= 0
        valid = matched_idxs >= BACKGROUND  # positives and negatives, not IGNORE
        normaliser = positive.sum().clamp(min=1).float()
        w_pos, w_neg = (self.alpha, 1.0 - self.alpha) if self.alpha >= 0 else (1.0, 1.0)

        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            logits = pred_logits.float()  # [N, A, K]
            num_columns = logits.shape[-1]
            # Every non-ignored (anchor, class) pair as a negative first ...
            loss_cls = w_neg * _NegativeFocalSum.apply(
                logits.reshape(-1, num_columns), valid.reshape(-1).float(), self.gamma
            )
            # ... then, for each positive's own class, swap the negative term for the positive one.
            pos_image, pos_anchor = positive.nonzero(as_tuple=True)
            pos_label = labelled["gt_labels_per_anchor"][pos_image, pos_anchor]
            x = logits[pos_image, pos_anchor, pos_label]
            p = torch.sigmoid(x)
            loss_cls = (
                loss_cls
                + (
                    w_pos * (1 - p).pow(self.gamma) * F.softplus(-x)
                    - w_neg * p.pow(self.gamma) * F.softplus(x)
                ).sum()
            )
            loss_cls = loss_cls / normaliser
            loss_box = (
                self.box_loss(outputs["pred_box_deltas"], anchors, labelled["gt_boxes_per_anchor"], positive)
                / normaliser
            )
        return {"loss_cls": loss_cls, "loss_box": loss_box}
