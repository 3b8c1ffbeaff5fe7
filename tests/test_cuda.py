"""The CUDA paths, checked against the CPU or eager reference on the same inputs: post-processing's
batched_nms, fp16 AMP with the grad scaler, bf16 autocast, channels-last, train/resume and torchrun DDP
with NCCL (one process), eagerly and with --compile. Every test is ``@pytest.mark.cuda`` and skipped
without CUDA; ``pytest -m cuda tests/test_cuda.py`` runs them (bench/gpu_suite.sh does).

Nothing here imports pycocotools, tensorboardX, visdom, faster-coco-eval or matplotlib (the GPU machine
lacks them): training runs with --no_val, and the modules below import those packages lazily.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from tiny_shapes import MODEL_OPTS, ROOT, make_tiny_shapes

import layers.postprocess as postprocess_module
import train
from engine import train_one_iter
from layers.anchors import AnchorGenerator
from layers.box_coder import BoxCoder
from layers.postprocess import PostProcess
from models import build_model
from utils.checkpoint import load_checkpoint
from utils.options import get_common_parser, resolve_defaults

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA_MODEL_OPTS = [("cuda" if a == "cpu" else a) for a in MODEL_OPTS]  # --device cuda
TRAIN_TAIL = ["--batch_size", "4", "--lr", "0.01", "--step_values", "", "--warmup_iters", "0"]
TRAIN_TAIL += ["--log_step", "1", "--no_val", "--keep_checkpoints", "0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


def tiny_model_and_criterion(*extra, num_classes=3, seed=0):
    args = get_common_parser().parse_args(MODEL_OPTS[: MODEL_OPTS.index("--device")] + list(extra))
    args = resolve_defaults(args)
    args.num_classes = num_classes
    torch.manual_seed(seed)
    model, criterion, _ = build_model(args, load_pretrained=False)
    return model.cuda(), criterion.cuda()


def batch(num_images=4, side=64, seed=0):
    """Images (Tensor[N, 3, side, side]) and targets with 1-3 boxes each, on CUDA."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, side, side, generator=generator)
    targets = []
    for _ in range(num_images):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * side * 0.6
        wh = 8 + torch.rand(count, 2, generator=generator) * side * 0.3
        targets.append(
            {
                "boxes": torch.cat([xy, (xy + wh).clamp(max=side)], 1).cuda(),
                "labels": torch.randint(0, 3, (count,), generator=generator).cuda(),
                "difficult": torch.zeros(count, dtype=torch.bool).cuda(),
                "iscrowd": torch.zeros(count, dtype=torch.bool).cuda(),
                "size": torch.tensor([side, side]).cuda(),
            }
        )
    return images.cuda(), targets


@pytest.mark.parametrize(
    "score_type, options",
    [
        ("softmax", {}),
        ("sigmoid", {}),
        ("softmax", {"class_agnostic": True}),
        ("softmax", {"per_class_topk": True, "max_per_class": 5, "max_detections": 0}),
    ],
)
def test_postprocess_cuda_batched_nms_matches_cpu(score_type, options, monkeypatch):
    """The CUDA path (batched_nms) and the CPU path (grouped nms) keep the same detections."""
    generator = torch.Generator().manual_seed(1)
    num_images, side, num_classes = 3, 256, 5
    anchor_generator = AnchorGenerator(
        [torch.tensor([[32.0, 32.0], [24.0, 48.0], [48.0, 24.0]]) * 2**i for i in range(5)]
    )
    grid_sizes = anchor_generator.grid_sizes_for_input(side, side)
    anchors = anchor_generator(grid_sizes, torch.device("cpu"))
    num_anchors = anchors.shape[0]
    columns = num_classes + 1 if score_type == "softmax" else num_classes
    outputs = {
        "pred_logits": torch.randn(num_images, num_anchors, columns, generator=generator) * 2 - 3,
        "pred_box_deltas": torch.randn(num_images, num_anchors, 4, generator=generator) * 0.5,
        "anchors": anchors,
        "num_anchors_per_level": anchor_generator.num_anchors_per_level(grid_sizes),
    }
    targets = [
        {"size": torch.tensor([side, side - 16 * i]), "scale": torch.tensor([0.5, 0.5])}
        for i in range(num_images)
    ]
    post = PostProcess(BoxCoder(), score_type=score_type, conf_thresh=0.05, **options)
    nms_calls = []
    real_batched_nms = postprocess_module.batched_nms

    def counting_batched_nms(*args, **kwargs):
        nms_calls.append(args[0].device.type)
        return real_batched_nms(*args, **kwargs)

    monkeypatch.setattr(postprocess_module, "batched_nms", counting_batched_nms)
    rounds = []  # NMS runs: one per round of the prefix path (layers/postprocess.py), one per-level
    real_nms_step = PostProcess._nms
    monkeypatch.setattr(PostProcess, "_nms", lambda self, *a: rounds.append(1) or real_nms_step(self, *a))
    on_cpu = post(outputs, targets)
    assert nms_calls == []  # the CPU path: nms per group
    cpu_rounds, rounds[:] = len(rounds), []
    on_cuda = post(
        {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()},
        [{k: v.cuda() for k, v in t.items()} for t in targets],
    )
    # The CUDA path: one batched_nms over the batch per NMS run, and as many runs as on the CPU.
    assert cpu_rounds >= 1 and nms_calls == ["cuda"] * cpu_rounds == ["cuda"] * len(rounds)
    assert sum(len(d["scores"]) for d in on_cpu) > 50  # enough detections for the comparison to mean much
    for cpu, cuda in zip(on_cpu, on_cuda):
        assert torch.equal(cuda["labels"].cpu(), cpu["labels"])
        assert torch.equal(cuda["anchor_idxs"].cpu(), cpu["anchor_idxs"])
        torch.testing.assert_close(cuda["scores"].cpu(), cpu["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cuda["boxes"].cpu(), cpu["boxes"], rtol=1e-5, atol=1e-4)


def test_amp_fp16_step_uses_the_grad_scaler():
    model, criterion = tiny_model_and_criterion()
    images, targets = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = []
    model.head.register_forward_hook(lambda m, i, out: dtypes.append(out["pred_logits"].dtype))
    scaled = []
    real_scale = scaler.scale
    scaler.scale = lambda loss: scaled.append(float(loss.detach())) or real_scale(loss)
    terms = train_one_iter(model, criterion, images, targets, optimizer, 0, scaler, torch.float16)
    assert dtypes == [torch.float16]  # the network ran under fp16 autocast
    assert torch.isfinite(torch.tensor(terms["loss"])) and terms["loss"] > 0
    assert len(scaled) == 1 and scaled[0] == pytest.approx(
        terms["loss"], rel=1e-2
    )  # the loss went through it
    # A step without inf/NaN gradients: the scale kept, the growth tracker counted it, the weights moved.
    assert scaler.get_scale() == 2.0**8 and int(scaler._get_growth_tracker()) == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_outputs_and_step():
    model, criterion = tiny_model_and_criterion()
    images, targets = batch(side=128)  # P6 of 2x2, P7 of 1x1 (oneDNN's bf16 bug at 1x1 P6 is CPU-only)
    model.eval()
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(images)
    assert low["pred_logits"].dtype == torch.bfloat16 and reference["pred_logits"].dtype == torch.float32
    torch.testing.assert_close(low["pred_logits"].float(), reference["pred_logits"], rtol=0.05, atol=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    terms = train_one_iter(model, criterion, images, targets, optimizer, 0, None, torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_gives_the_same_outputs_and_gradients():
    torch.backends.cudnn.allow_tf32, saved = False, torch.backends.cudnn.allow_tf32  # exact fp32 convs
    try:
        nchw, criterion = tiny_model_and_criterion()
        nhwc, _ = tiny_model_and_criterion()
        nhwc.to(memory_format=torch.channels_last)
        images, targets = batch()
        last_features = []
        nhwc.backbone.register_forward_hook(lambda m, i, out: last_features.append(out[-1]))
        grads, outputs = [], []
        for model, x in ((nchw, images), (nhwc, images.contiguous(memory_format=torch.channels_last))):
            model.train()
            sum(criterion(model(x, targets), targets).values()).backward()
            grads.append(model.head.cls_pred.weight.grad.clone())
            model.eval()
            with torch.no_grad():
                outputs.append(model(x))
        assert last_features[-1].is_contiguous(memory_format=torch.channels_last)  # it really ran NHWC
        for key in ("pred_logits", "pred_box_deltas"):
            torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def run_train(data_root, save_root, name, *extra):
    argv = CUDA_MODEL_OPTS + TRAIN_TAIL + ["--data_root", data_root, "--save_root", str(save_root)]
    return train.main(train.get_args_parser().parse_args(argv + ["--run_name", name, *extra]))


def final_weights(run_dir, iteration):
    return load_checkpoint(os.path.join(run_dir, f"model_{iteration:06d}.pth"))["model"]


def assert_weights_close(a, b, tol):
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=tol, atol=tol, msg=key)


def test_train_and_resume_on_cuda(data_root, tmp_path):
    """4 iterations at once = 2, stopped, then resumed to 4 (fp32; cuDNN's nondeterminism tolerated)."""
    whole = run_train(data_root, tmp_path, "whole", "--max_iter", "4", "--save_step", "2")
    run_train(data_root, tmp_path, "parts", "--max_iter", "2", "--save_step", "2")
    parts = run_train(data_root, tmp_path, "parts", "--max_iter", "4", "--save_step", "2", "--resume", "auto")
    assert whole["iteration"] == parts["iteration"] == 4
    state = load_checkpoint(os.path.join(parts["run_dir"], "model_000004.pth"))
    assert "cuda" in state["rng_states"][0]  # the CUDA generator was saved for the resume
    first = final_weights(whole["run_dir"], 2)
    assert any(not torch.equal(first[k], state["model"][k]) for k in first)  # iterations 3-4 trained
    assert_weights_close(state["model"], final_weights(whole["run_dir"], 4), 1e-3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(data_root, save_root, name, *extra):
    argv = CUDA_MODEL_OPTS + TRAIN_TAIL + ["--data_root", data_root, "--save_root", str(save_root)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    command += ["--master_port", str(free_port()), os.path.join(ROOT, "train.py")]
    result = subprocess.run(
        command + argv + ["--run_name", name, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(str(save_root), name, "train.log")) as f:
        return f.read()


def test_torchrun_one_process_ddp_with_nccl_trains_like_one_process(data_root, tmp_path):
    log = torchrun_train(data_root, tmp_path, "ddp", "--max_iter", "2", "--save_step", "2")
    assert "DistributedDataParallel over 1 processes (nccl backend)" in log
    single = run_train(data_root, tmp_path, "single", "--max_iter", "2", "--save_step", "2")
    # One process: DDP's all-reduce averages one gradient, so the weights are those of a plain run.
    assert_weights_close(final_weights(str(tmp_path / "ddp"), 2), final_weights(single["run_dir"], 2), 1e-3)


def test_torchrun_ddp_with_compile_writes_the_eager_checkpoint_keys(data_root, tmp_path):
    """DDP (NCCL) around the in-place compiled network: dynamo's DDPOptimizer path; the same keys."""
    log = torchrun_train(
        data_root, tmp_path, "ddp_compiled", "--max_iter", "2", "--save_step", "2", "--compile"
    )
    assert "torch.compile (mode default) of backbone, fpn, head" in log
    single = run_train(data_root, tmp_path, "eager", "--max_iter", "2", "--save_step", "2")
    compiled = final_weights(str(tmp_path / "ddp_compiled"), 2)
    # Inductor's kernels sum in another order than cuDNN's: the same weights to a looser tolerance.
    assert_weights_close(compiled, final_weights(single["run_dir"], 2), 1e-2)
