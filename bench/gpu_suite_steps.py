"""The in-process steps of bench/gpu_suite.py (its module docstring says what each measures).

Each runs in its own child process (``gpu_suite.py --run_step NAME``) and returns a JSON-able dict. torch,
torchvision and the repository's modules are imported inside the steps, so the orchestrator stays
import-light; nothing here imports pycocotools, tensorboardX, visdom, faster-coco-eval or matplotlib.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Dict

NUM_CLASSES_OURS = 80  # + background: 81 score columns
NUM_CLASSES_TORCHVISION = 91  # torchvision's COCO label space


def synthetic_batch(config: Dict[str, Any], label_offset: int, num_labels: int, seed: int = 0):
    """Images (Tensor[N, 3, D, D], N(0, 1) as after normalisation) and targets with 2-20 boxes each
    (xyxy pixels, at least 16 px wide), on the device; labels in label_offset..label_offset+num_labels-1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    n, side, device = config["batch_size"], config["input_dim"], torch.device(config["device"])
    images = torch.randn(n, 3, side, side, generator=generator).to(device)
    targets = []
    for _ in range(n):
        count = int(torch.randint(2, 21, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * (side - 32)
        wh = 16 + torch.rand(count, 2, generator=generator) * (side / 2)
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor(float(side)))], dim=1)
        size = torch.tensor([side, side])
        targets.append(
            {
                "boxes": boxes.to(device),
                "labels": (label_offset + torch.randint(0, num_labels, (count,), generator=generator)).to(
                    device
                ),
                "difficult": torch.zeros(count, dtype=torch.bool, device=device),
                "iscrowd": torch.zeros(count, dtype=torch.bool, device=device),
                "size": size.to(device),
                "orig_size": size.to(device),
                "scale": torch.ones(2, device=device),
            }
        )
    return images, targets


def build_ours(config: Dict[str, Any]):
    """Our model, criterion and optimizer from train.py's own parser and builders."""
    import torch

    import train
    from models import build_model
    from utils.options import check_common_args, resolve_defaults

    argv = ["--basenet", config["basenet"], "--pretrained", "none", "--input_dim", str(config["input_dim"])]
    argv += ["--anchor_type", config["anchor_type"], "--batch_size", str(config["batch_size"])]
    argv += ["--device", config["device"], "--amp", "--amp_dtype", config["amp"], "--channels_last"]
    args = resolve_defaults(train.get_args_parser().parse_args(argv))
    check_common_args(args)
    args.num_classes = NUM_CLASSES_OURS
    torch.manual_seed(0)
    model, criterion, _ = build_model(args, load_pretrained=False)
    device = torch.device(config["device"])
    model.to(device).to(memory_format=torch.channels_last).train()
    criterion.to(device)
    return model, criterion, train.build_optimizer(model, args)


def build_torchvision(config: Dict[str, Any]):
    """torchvision's RetinaNet at the same input, with nothing resized or normalised again."""
    import torch
    from torchvision.models.detection import retinanet_resnet50_fpn

    if config["basenet"] != "resnet50":  # --tiny: the same RetinaNet on a ResNet-18 body
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.retinanet import RetinaNet, _default_anchorgen
        from torchvision.models.resnet import resnet18
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        body = resnet18(weights=None)
        backbone = _resnet_fpn_extractor(
            body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
        )
        model = RetinaNet(
            backbone,
            NUM_CLASSES_TORCHVISION,
            anchor_generator=_default_anchorgen(),
            min_size=config["input_dim"],
            max_size=config["input_dim"],
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
        )
    else:
        torch.manual_seed(0)
        model = retinanet_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=NUM_CLASSES_TORCHVISION,
            min_size=config["input_dim"],
            max_size=config["input_dim"],
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
        )
    device = torch.device(config["device"])
    model.to(device).to(memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0005, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def make_step(side: str, config: Dict[str, Any], compile_backend: str | None = None, amp: bool = True):
    """(step function running one training iteration, its model, a note) for "ours" or "torchvision"."""
    import torch

    from engine import train_one_iter

    device = torch.device(config["device"])
    amp_dtype = torch.bfloat16 if amp else None
    if side == "ours":
        model, criterion, optimizer = build_ours(config)
        if compile_backend is not None:
            from utils.compile import compile_network

            compile_network(model, "default", backend=compile_backend)
        images, targets = synthetic_batch(config, 0, NUM_CLASSES_OURS)

        def step():
            return train_one_iter(model, criterion, images, targets, optimizer, 0, None, amp_dtype)

        return step, model
    model, optimizer = build_torchvision(config)
    images, targets = synthetic_batch(config, 1, NUM_CLASSES_TORCHVISION - 1)  # 0: its background
    image_list = list(images.unbind(0))
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

    def step():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = model(image_list, tv_targets)
        loss = sum(losses.values())
        value = loss.item()  # as its references/detection loop: a host sync and a finite check
        if value != value or abs(value) == float("inf"):
            raise FloatingPointError(f"torchvision loss is {value}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": value}

    return step, model


def synchronize(device_type: str) -> None:
    import torch

    if device_type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device_type: str) -> float:
    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def step_train(config: Dict[str, Any], side: str, compiled: bool = False) -> Dict[str, Any]:
    """Training images/s of ``side`` over config["iters"] iterations after config["warmup"]."""
    device_type = config["device"].split(":")[0]
    start = time.perf_counter()
    step, _ = make_step(side, config, config["compile_backend"] if compiled else None)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    first = step()  # the first iteration: cuDNN autotuning and, compiled, the compilation
    synchronize(device_type)
    first_s = time.perf_counter() - start
    for _ in range(max(config["warmup"] - 1, 0)):
        step()
    synchronize(device_type)
    start = time.perf_counter()
    for _ in range(config["iters"]):
        terms = step()
    synchronize(device_type)
    seconds = time.perf_counter() - start
    images = config["iters"] * config["batch_size"]
    return {
        "images_per_s": images / seconds,
        "seconds_per_iter": seconds / config["iters"],
        "first_iter_s": first_s,
        "build_s": build_s,
        "peak_memory_gib": peak_memory_gib(device_type),
        "loss_first": float(first["loss"]),
        "loss_last": float(terms["loss"]),
        **({"compile_backend": config["compile_backend"]} if compiled else {}),
    }


def step_memory(config: Dict[str, Any], side: str, amp: bool = True) -> Dict[str, Any]:
    """Peak memory of one forward + loss + backward (after one untimed step), weights and grads included."""
    import torch

    from engine import autocast_context

    device_type = config["device"].split(":")[0]
    device = torch.device(config["device"])
    amp_dtype = torch.bfloat16 if amp else None
    if side == "ours":
        model, criterion, _ = build_ours(config)
        if not amp:
            model.to(memory_format=torch.contiguous_format)
        images, targets = synthetic_batch(config, 0, NUM_CLASSES_OURS)

        def forward_backward():
            with autocast_context(device, amp_dtype):
                loss = sum(criterion(model(images, targets), targets).values())
            loss.backward()

    else:
        model, _ = build_torchvision(config)
        images, targets = synthetic_batch(config, 1, NUM_CLASSES_TORCHVISION - 1)
        image_list = list(images.unbind(0))
        tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

        def forward_backward():
            with autocast_context(device, amp_dtype):
                loss = sum(model(image_list, tv_targets).values())
            loss.backward()

    forward_backward()  # allocator warm-up and cuDNN autotuning, not measured
    model.zero_grad(set_to_none=True)
    synchronize(device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if device_type == "cuda" else None
    forward_backward()
    synchronize(device_type)
    return {
        "peak_memory_gib": peak_memory_gib(device_type),
        "resident_before_gib": resident,
        "method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        if device_type == "cuda"
        else "peak RSS of the process (ru_maxrss), model build included",
        "amp": config["amp"] if amp else None,
        "channels_last": amp,  # the fp32 figure is NCHW as well
    }


def step_env(config: Dict[str, Any]) -> Dict[str, Any]:
    import platform

    import torch
    import torchvision

    cuda = config["device"].startswith("cuda")
    return {
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "gpu_capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


IN_PROCESS_STEPS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "env": step_env,
    "train_ours": lambda c: step_train(c, "ours"),
    "train_torchvision": lambda c: step_train(c, "torchvision"),
    "train_ours_compiled": lambda c: step_train(c, "ours", compiled=True),
    "memory_ours": lambda c: step_memory(c, "ours"),
    "memory_torchvision": lambda c: step_memory(c, "torchvision"),
    "memory_ours_fp32": lambda c: step_memory(c, "ours", amp=False),
}
