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
