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
# label_anchors matches this many (image, gt, anchor) IoUs at a time (at least one image): 4 MB per
# [n, G, A] float32 buffer.
_MATCH_CHUNK_ELEMENTS = 1 << 20

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
        if self.matcher == "atss" and num_anchors_per_level is None:
            raise ValueError("the ATSS matcher needs the model's num_anchors_per_level")
        # Both matchers label each image independently of the others. Chunks of images keep their
        # [n, G, A] IoU buffers a few MB, which the allocator serves again from freed memory, where one
        # batch-wide buffer would be fresh memory on every call (first-touch page faults on CPU).
        num_images, num_gt = gt_valid.shape
        step = max(1, _MATCH_CHUNK_ELEMENTS // max(1, num_gt * anchors.shape[0]))
        matched_per_chunk = []
        for i in range(0, num_images, step):
            chunk = (gt_boxes[i : i + step], gt_valid[i : i + step], gt_ignore[i : i + step])
            if self.matcher == "atss":
                matched_per_chunk.append(
                    atss_match(
                        anchors,
                        num_anchors_per_level,
                        *chunk,
                        self.atss_topk,
                        ignore_threshold=self.negative_threshold,
                    )
                )
            else:
                matched_per_chunk.append(
                    match_anchors(
                        anchors,
                        *chunk,
                        self.positive_threshold,
                        self.negative_threshold,
                        allow_low_quality=True,
                        best_anchor_match=self.best_anchor_match,
                    )
                )
        matched_idxs = (
            torch.cat(matched_per_chunk)
            if matched_per_chunk
            else torch.full((0, anchors.shape[0]), BACKGROUND, dtype=torch.int64, device=anchors.device)
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


# Rows per chunk and intra-op thread: [rows, K] temporaries stay a few MB per thread, so they are served
# from the allocator's free memory instead of fresh pages (on CPU, first-touch page faults cost more
# than the arithmetic). Per thread, so that the number of parallel ops, each waiting for its slowest
# thread (long waits on a loaded machine), does not grow with the thread count.
_CHUNK_ROWS_PER_THREAD = 4096


def _softplus(x: Tensor, out: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20) written into ``out``."""
    return torch._C._nn.softplus(x, 1, 20, out=out)


def _negative_focal_terms(logits: Tensor, gamma: float, grad: Tensor | None) -> Tensor:
    """Per row r, sum_k p^gamma * softplus(x) (p = sigmoid(x)); with ``grad``, also d/dx of each term.

    logits (Tensor[M, K] float32). Returns Tensor[M]; writes p^gamma * (gamma * (1 - p) * softplus(x) + p)
    (see _SigmoidFocalSum) into ``grad`` (Tensor[M, K]) when given. Chunks of rows: two [rows, K] buffers
    reused across chunks, and nothing else of size [M, K] but ``grad``.
    """
    num_rows, num_columns = logits.shape
    rows = max(1, min(_CHUNK_ROWS_PER_THREAD * torch.get_num_threads(), num_rows))
    p_buf, s_buf = logits.new_empty((rows, num_columns)), logits.new_empty((rows, num_columns))
    row_sums = logits.new_empty(num_rows)
    for begin in range(0, num_rows, rows):
        x = logits[begin : begin + rows]
        m = x.shape[0]
        p = torch.sigmoid(x, out=p_buf[:m])
        s = _softplus(x, s_buf[:m])
        if grad is not None:
            g = grad[begin : begin + m]
            # gamma * (1 - p) * s + p, as p + (-gamma) * (p - 1) * s; (p - 1) is formed in g itself.
            torch.addcmul(p, torch.sub(p, 1, out=g), s, value=-gamma, out=g)
        p.pow_(gamma)
        if grad is not None:
            g.mul_(p)
        torch.sum(s.mul_(p), dim=1, out=row_sums[begin : begin + m])
    return row_sums


class _SigmoidFocalSum(torch.autograd.Function):
    """Focal loss (Lin et al. 2017) summed over the scored (anchor, class) pairs, / normaliser, with the
    gradient computed during the forward pass.

    Inputs: logits (Tensor[M, K] float32, M = N * A rows), row_valid (Tensor[M] float32: 1 for positive and
    negative anchors, 0 for IGNORE), pos_rows and pos_cols (Tensor[P] int64: each positive anchor's row and
    its class), normaliser (0-dim float32), alpha (< 0: no weighting), gamma, needs_grad.

    Value: with w_neg = 1 - alpha and w_pos = alpha (both 1 if alpha < 0), p = sigmoid(x),
    s = softplus(x) = -log(1 - p) and u = softplus(-x) = -log(p),

        [ w_neg * sum over valid rows and all K columns of p^gamma * s
          + sum over positives of (w_pos * (1 - p)^gamma * u - w_neg * p^gamma * s) ] / normaliser,

    i.e. every valid pair is scored as a negative first, then each positive's own class swaps its
    negative term for the positive one: no [M, K] target tensor. This equals
    torchvision.ops.sigmoid_focal_loss(reduction="sum") over the valid rows with one-hot targets.

    Gradient. With ds/dx = p, du/dx = -(1 - p) and dp/dx = p (1 - p):

        d/dx [p^gamma * s]       = gamma p^(gamma - 1) * p (1 - p) * s + p^gamma * p
                                 = p^gamma * (gamma * (1 - p) * s + p),
        d/dx [(1 - p)^gamma * u] = -gamma (1 - p)^(gamma - 1) * p (1 - p) * u - (1 - p)^gamma * (1 - p)
                                 = -(1 - p)^gamma * (gamma * p * u + (1 - p)).

    The forward pass needs p and s of every pair anyway, so it also writes the first derivative of every
    pair into a [M, K] buffer (chunk by chunk, in place), overwrites the positives' entries with
    w_pos / w_neg times the second, and zeroes the IGNORE rows. That buffer is the gradient up to the
    factor w_neg / normaliser, which backward applies in place together with grad_output: no
    recomputation of sigmoid and softplus, and the buffer is the one [M, K] tensor of the whole pass
    (it becomes the logits' gradient). tests/test_losses.py checks value and gradient against autograd
    through torchvision's sigmoid_focal_loss.
    """

    @staticmethod
    def forward(ctx, logits, row_valid, pos_rows, pos_cols, normaliser, alpha, gamma, needs_grad):
        w_pos, w_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
        grad = torch.empty_like(logits) if needs_grad else None
        row_sums = _negative_focal_terms(logits, gamma, grad)
        # float64 for the sum over M rows, whose float32 rounding would reach 1e-6 of the total.
        negative_sum = row_sums.double().dot(row_valid.double())
        x = logits[pos_rows, pos_cols]
        p, q = torch.sigmoid(x), torch.sigmoid(-x)  # q = 1 - p, without the cancellation for p near 1
        positive_terms = w_pos * q.pow(gamma) * F.softplus(-x) - w_neg * p.pow(gamma) * F.softplus(x)
        positive_sum = positive_terms.sum()
        loss = ((w_neg * negative_sum + positive_sum) / normaliser).float()
        if needs_grad:
            d_positive = -(q.pow(gamma) * (gamma * p * F.softplus(-x) + q))
            if w_neg == 0:  # negatives weigh nothing: no common factor to take out
                grad.zero_()
                grad[pos_rows, pos_cols] = w_pos * d_positive
                ctx.scale = 1.0 / normaliser
            else:
                grad[pos_rows, pos_cols] = (w_pos / w_neg) * d_positive
                ctx.scale = w_neg / normaliser
            grad.index_fill_(0, (row_valid == 0).nonzero().flatten(), 0.0)
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "the focal loss computes its gradient in the forward pass and hands it over once: "
                "a second backward (retain_graph=True) needs a second forward"
            )
        return grad.mul_(ctx.scale * grad_output), None, None, None, None, None, None, None


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

        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            logits = pred_logits.float()  # [N, A, K]
            num_columns = logits.shape[-1]
            pos_image, pos_anchor = positive.nonzero(as_tuple=True)
            loss_cls = _SigmoidFocalSum.apply(
                logits.reshape(-1, num_columns).contiguous(),
                valid.reshape(-1).float(),
                pos_image * logits.shape[1] + pos_anchor,
                labelled["gt_labels_per_anchor"][pos_image, pos_anchor],
                normaliser,
                self.alpha,
                self.gamma,
                torch.is_grad_enabled() and logits.requires_grad,
            )
            loss_box = (
                self.box_loss(outputs["pred_box_deltas"], anchors, labelled["gt_boxes_per_anchor"], positive)
                / normaliser
            )
        return {"loss_cls": loss_cls, "loss_box": loss_box}
