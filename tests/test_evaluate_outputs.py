"""evaluate.py's own helpers: the autocast choice for a checkpoint."""

import argparse

import torch

from evaluate import inference_amp


def test_inference_follows_the_checkpoints_amp():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference_amp(argparse.Namespace(amp=False, amp_dtype="bf16"), cpu) is None
    assert inference_amp(argparse.Namespace(amp=True, amp_dtype="bf16"), cpu) is torch.bfloat16
    # fp16 autocast needs CUDA: a checkpoint trained with it is evaluated in fp32 on the CPU ...
    assert inference_amp(argparse.Namespace(amp=True, amp_dtype="fp16"), cpu) is None
    # ... and in fp16 on CUDA (no GPU needed to decide).
    assert inference_amp(argparse.Namespace(amp=True, amp_dtype="fp16"), cuda) is torch.float16


def test_the_headline_is_one_flat_dict_for_evaluate_and_validation():
    """report (evaluate.py) returns engine.metric_summary: `<metric>_<key of that metric's dict>`, with the
    image counts when evaluate() gave them; train.py logs the same keys prefixed val_."""
    from engine import metric_summary
    from evaluate import report

    metrics = {
        "voc": {"map_07_11pt": 0.25, "map_area": 0.5, "table": "t", "iou_thresh": 0.5},
        "coco": {"AP": 0.1, "AP50": 0.2, "AP75": 0.05, "AR100": 0.3, "summary": "s"},
        "images": {"evaluated": 5, "skipped": 1, "skipped_files": ["b.png"]},
    }
    expected = {
        "num_images": 5,
        "skipped_images": 1,
        "voc_map_07_11pt": 0.25,
        "voc_map_area": 0.5,
        "coco_AP": 0.1,
        "coco_AP50": 0.2,
        "coco_AP75": 0.05,
    }
    assert metric_summary(metrics) == expected and report(metrics, "tag") == expected
    assert metric_summary({"oid": {"map": 0.75, "table": "t"}}) == {"oid_map": 0.75}
