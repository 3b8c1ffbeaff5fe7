"""The GPU path in one prepared run (issue 18): every figure in ONE JSON file, printed last.

    bash bench/gpu_suite.sh --out runs/gpu_suite.json          # on one GPU: at most --budget_s (480 s)
    bash bench/gpu_suite.sh --device cpu --tiny                # on the CPU: the same steps, seconds each

Each step runs in its own process, time-boxed (min(its box, what is left of --budget_s)); a step that
fails, times out or is missing records its status and error in the JSON and the suite goes on. The JSON
is rewritten after every step, so a suite that is killed leaves what it measured. Steps, in the order
they run (the headline figures first):

- env: the GPU's name (torch.cuda.get_device_name), torch/torchvision/CUDA/cuDNN versions.
- train_ours, train_torchvision: training images/s at --input_dim 600, ResNet-50 from scratch, batch 24,
  bf16 autocast, channels-last, SGD, --iters 50 timed after --warmup 10. Ours: models.build_model and
  engine.train_one_iter as train.py runs them (mbox OHEM loss, --anchor_type pdf9: 9 anchors per
  location, 80 classes + background = 81 columns). torchvision: retinanet_resnet50_fpn(weights=None,
  weights_backbone=None, num_classes=91), its transform at min_size = max_size = 600 with identity
  normalisation (no second resize or normalisation), with the same loss .item() check per step as its
  references/detection train loop. Both are fed the same synthetic in-memory batch.
- memory_ours, memory_torchvision: peak torch.cuda.max_memory_allocated of one COCO training step (forward
  + loss + backward; weights and gradients included, no optimizer state) in the same setting, batch 24,
  600 px, bf16 + channels-last (ours in fp32 NCHW too: memory_ours_fp32, the last step). On the CPU:
  peak RSS instead.
- pytest_cuda: ``pytest -m cuda tests/test_cuda.py`` (passed / failed / skipped counts, failed names).
- train_ours_compiled: train_ours with --compile (utils/compile.py; the warm-up includes compilation,
  whose time is recorded). --tiny compiles with dynamo's eager backend: the plumbing, not the speed.
- data_loader, data_per_worker: bench/bench_data.py --loader (16 workers, batch 24, 600 px, 50 batches)
  and its per-worker mode, their JSON merged in (status "missing" when the script is not there).
- components: bench/bench_components.py --device (ours vs torchvision's loss, post-processing and
  full step on the same tensors), its last JSON line.

The JSON: {suite, date, device, gpu_name, torch, torchvision, tiny, budget_s, elapsed_s, config,
steps: {name: {status, seconds, error, result}}, figures: {flat numbers}, targets: {name: bool | null}}.
Targets (null when not judged: a missing figure, or --tiny / CPU runs, which are not the target setting):
>= 150 training images/s at 600 px with AMP, ahead of torchvision's RetinaNet in the same run, and the
COCO step at batch 24 within 24 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gpu_suite_steps import IN_PROCESS_STEPS  # noqa: E402  (bench/, this file's folder, is on sys.path)

TARGET_IMAGES_PER_S = 150.0
TARGET_MEMORY_GIB = 24.0
# (step, seconds it may take at most on a GPU): the budget cuts them further. Order = run order.
STEP_BOXES = (
    ("env", 60),
    ("train_ours", 90),
    ("train_torchvision", 90),
    ("memory_ours", 60),
    ("memory_torchvision", 60),
    ("pytest_cuda", 210),
    ("train_ours_compiled", 180),
    ("data_loader", 60),
    ("data_per_worker", 60),
    ("components", 90),
    ("memory_ours_fp32", 60),
)
STEPS = tuple(name for name, _ in STEP_BOXES)
MIN_STEP_S = 10  # a step is not started with less than this left
# --tiny: every step takes seconds on an idle CPU, but minutes where the CPU is shared (a box per step;
# the budget --tiny_budget_s)
TINY_BOX_S = 600


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="128 px, batch 2, ResNet-18, 3 timed iterations: every step in seconds (a CPU smoke run)",
    )
    parser.add_argument(
        "--out", default=None, help="the JSON file (default runs/gpu_suite/gpu_suite_DATE.json)"
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="the whole suite's wall-clock limit (default 480 s; --tiny: 3600 s, for shared CPUs)",
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of: {', '.join(STEPS)}"
    )
    parser.add_argument("--input_dim", type=int, default=None, help="default 600 (--tiny: 128)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 24 (--tiny: 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 50, --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (10, --tiny 1)")
    parser.add_argument("--basenet", default=None, help="default resnet50 (--tiny: resnet18)")
    # internal: one in-process step, its result written to --step_out
    parser.add_argument("--run_step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step_out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The measured setting: the GPU defaults, or --tiny's; options given explicitly win."""
    tiny = args.tiny
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = {
        "device": device,
        "tiny": tiny,
        "input_dim": args.input_dim or (128 if tiny else 600),
        "batch_size": args.batch_size or (2 if tiny else 24),
        "iters": args.iters or (3 if tiny else 50),
        "warmup": args.warmup if args.warmup is not None else (1 if tiny else 10),
        "basenet": args.basenet or ("resnet18" if tiny else "resnet50"),
        "amp": "bf16",
        "channels_last": True,
        "anchor_type": "pdf9",
        "compile_backend": "eager" if tiny else "inductor",
    }
    errors = []
    for key in ("input_dim", "batch_size", "iters"):
        if config[key] < 1:
            errors.append(f"--{key} must be >= 1, got {config[key]}")
    if config["warmup"] < 0:
        errors.append(f"--warmup must be >= 0, got {config['warmup']}")
    if config["input_dim"] < 128:
        # below 128 px the P7 map is under 1x1 pixel's worth of stride and CPU bf16 is wrong there
        errors.append(f"--input_dim must be >= 128, got {config['input_dim']}")
    if errors:
        raise SystemExit("Bad options:\n  " + "\n  ".join(errors))
    return config


# ------------------------------------------------------------------------------------------------
# The orchestrator: each step a time-boxed child process (the in-process steps, run as
# `gpu_suite.py --run_step NAME`, are in gpu_suite_steps.py).


def run_command(command: List[str], timeout_s: float) -> Tuple[str, int | None, str, str]:
    """Run ``command`` from the repository root in its own process group. Returns (status, returncode,
    stdout, stderr); status "ok", "failed" (non-zero exit) or "timeout" (the whole group killed)."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest's torchrun children and loader workers too
        stdout, stderr = process.communicate()
        return "timeout", None, stdout, stderr
    return ("ok" if process.returncode == 0 else "failed"), process.returncode, stdout, stderr


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:] if text else ""


def last_json_line(stdout: str) -> Dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def junit_counts(path: str) -> Dict[str, Any]:
    """passed / failed / errors / skipped and the failed tests' names from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed,
    }


def step_commands(name: str, config: Dict[str, Any], workdir: str) -> List[Tuple[List[str], str | None]]:
    """The (command, JSON file it writes or None for its last stdout line) pairs of an external step."""
    python = sys.executable
    tiny = config["tiny"]
    if name == "pytest_cuda":
        xml = os.path.join(workdir, "pytest_cuda.xml")
        command = [python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
        return [(command + ["-q", "-rfE", f"--junitxml={xml}"], xml)]
    if name in ("data_loader", "data_per_worker"):
        out = os.path.join(workdir, f"{name}.json")
        command = [python, "bench/bench_data.py"]
        if name == "data_loader":
            command += ["--loader", "--workers", "2" if tiny else "16"]
            command += [] if tiny else ["--batch_size", "24", "--input_dim", "600", "--num_batches", "50"]
        return [(command + (["--tiny"] if tiny else []) + ["--json_out", out], out)]
    if name == "components":
        command = [python, "bench/bench_components.py", "--device", config["device"]]
        if tiny:
            command += ["--batch_size", "1", "--input_dim", "128", "--repeats", "5", "--skip_full_step"]
        else:
            command += [
                "--repeats",
                "10",
                "--full_step_batch_size",
                "8",
                "--full_step_repeats",
                "5",
                "--memory",
            ]
        return [(command, None)]
    raise KeyError(name)


def run_step(name: str, config: Dict[str, Any], timeout_s: float, workdir: str) -> Dict[str, Any]:
    """One step in a child process: {status, seconds, error, result}."""
    start = time.perf_counter()
    record: Dict[str, Any] = {"status": "ok", "error": None, "result": None}
    if name.startswith("data_") and not os.path.isfile(os.path.join(ROOT, "bench", "bench_data.py")):
        record.update(status="missing", error="bench/bench_data.py does not exist on this branch")
    elif name in IN_PROCESS_STEPS:
        out = os.path.join(workdir, f"{name}.json")
        config_path = os.path.join(workdir, "config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        command = [sys.executable, os.path.abspath(__file__), "--run_step", name, "--step_out", out]
        command += ["--config", config_path]
        record.update(run_one(command, out, timeout_s))
    else:
        for command, out in step_commands(name, config, workdir):
            record.update(run_one(command, out, timeout_s, junit=name == "pytest_cuda"))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def run_one(command: List[str], out: str | None, timeout_s: float, junit: bool = False) -> Dict[str, Any]:
    status, returncode, stdout, stderr = run_command(command, timeout_s)
    record: Dict[str, Any] = {"status": status, "error": None, "result": None, "command": " ".join(command)}
    try:
        if junit:  # pytest exits 1 when a test fails: the counts are the result either way
            record["result"] = junit_counts(out)
            if status == "failed" and (record["result"]["failed"] or record["result"]["errors"]):
                record["error"] = "failed: " + ", ".join(record["result"]["failed_tests"])
        elif status == "ok":
            if out is None:
                record["result"] = last_json_line(stdout)
            else:
                with open(out) as f:
                    record["result"] = json.load(f)
    except (OSError, ValueError, ET.ParseError) as e:
        if status == "ok":
            record["status"] = "failed"
        record["error"] = f"no result: {type(e).__name__}: {e}"
    if status == "timeout":
        record["error"] = f"timed out after {timeout_s:.0f} s; stderr: {tail(stderr, 1000)}"
    elif status == "failed" and record["error"] is None:
        record["error"] = f"exit {returncode}: {tail(stderr) or tail(stdout)}"
    return record


def figures_and_targets(steps: Dict[str, Dict[str, Any]], config: Dict[str, Any]):
    """The flat figures of the steps' results, and the targets judged from them (None: not judged)."""
    figures: Dict[str, Any] = {}

    def result(name):
        record = steps.get(name) or {}
        return record.get("result") if record.get("status") in ("ok", "failed") else None

    for name in ("train_ours", "train_torchvision", "train_ours_compiled"):
        r = result(name)
        if r and "images_per_s" in r:
            figures[f"{name}_images_per_s"] = round(r["images_per_s"], 2)
            figures[f"{name}_peak_memory_gib"] = round(r["peak_memory_gib"], 3)
            figures[f"{name}_first_iter_s"] = round(r["first_iter_s"], 2)
    for name in ("memory_ours", "memory_torchvision", "memory_ours_fp32"):
        r = result(name)
        if r and "peak_memory_gib" in r:
            figures[f"{name}_peak_gib"] = round(r["peak_memory_gib"], 3)
    tv = figures.get("train_torchvision_images_per_s")
    for name in ("train_ours", "train_ours_compiled"):
        if tv and f"{name}_images_per_s" in figures:
            figures[f"ratio_{name}_vs_torchvision"] = round(figures[f"{name}_images_per_s"] / tv, 3)
    if figures.get("memory_torchvision_peak_gib") and "memory_ours_peak_gib" in figures:
        figures["ratio_memory_ours_vs_torchvision"] = round(
            figures["memory_ours_peak_gib"] / figures["memory_torchvision_peak_gib"], 3
        )
    r = result("pytest_cuda")
    if r:
        for key in ("passed", "failed", "errors", "skipped"):
            figures[f"pytest_cuda_{key}"] = r[key]
    for name in ("data_loader", "data_per_worker", "components"):
        r = result(name)
        if isinstance(r, dict):
            figures.update(
                {
                    f"{name}.{k}": v
                    for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )

    judged = config["device"].startswith("cuda") and not config["tiny"]

    def judge(values: List[Any], holds: Callable[[], bool]) -> bool | None:
        return None if not judged or any(v is None for v in values) else bool(holds())

    ours, compiled = figures.get("train_ours_images_per_s"), figures.get("train_ours_compiled_images_per_s")
    memory = figures.get("memory_ours_peak_gib")
    targets = {
        "train_600px_amp_ge_150_images_per_s": judge([ours], lambda: ours >= TARGET_IMAGES_PER_S),
        "train_600px_amp_ge_150_images_per_s_compiled": judge(
            [compiled], lambda: compiled >= TARGET_IMAGES_PER_S
        ),
        "train_ahead_of_torchvision": judge([ours, tv], lambda: ours > tv),
        "train_compiled_ahead_of_torchvision": judge([compiled, tv], lambda: compiled > tv),
        "coco_batch24_within_24gb": judge([memory], lambda: memory <= TARGET_MEMORY_GIB),
    }
    return figures, targets


def write_report(path: str, report: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
    os.replace(tmp, path)


def run_suite(args: argparse.Namespace) -> Dict[str, Any]:
    config = resolve_config(args)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        raise SystemExit(f"--steps: unknown steps {unknown}; known: {', '.join(STEPS)}")
    now = datetime.datetime.now()
    out = args.out or os.path.join(ROOT, "runs", "gpu_suite", f"gpu_suite_{now:%Y%m%d_%H%M%S}.json")
    start = time.perf_counter()
    report: Dict[str, Any] = {
        "suite": "bench/gpu_suite.py",
        "date": now.isoformat(timespec="seconds"),
        "device": config["device"],
        "gpu_name": None,
        "torch": None,
        "torchvision": None,
        "tiny": config["tiny"],
        "budget_s": args.budget_s,
        "elapsed_s": 0.0,
        "config": config,
        "steps": {},
        "figures": {},
        "targets": {},
    }
    budget_s = args.budget_s if args.budget_s is not None else (3600.0 if config["tiny"] else 480.0)
    if budget_s <= 0:
        raise SystemExit(f"--budget_s must be positive, got {budget_s}")
    report["budget_s"] = budget_s
    boxes = {name: TINY_BOX_S if config["tiny"] else box for name, box in STEP_BOXES}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        for name in [s for s in STEPS if s in wanted]:
            left = budget_s - (time.perf_counter() - start)
            if left < MIN_STEP_S:
                report["steps"][name] = {
                    "status": "skipped",
                    "seconds": 0.0,
                    "error": f"not started: {left:.0f} s left of --budget_s {budget_s:g}",
                    "result": None,
                }
                continue
            print(f"[gpu_suite] {name} (at most {min(boxes[name], left):.0f} s) ...", flush=True)
            record = run_step(name, config, min(boxes[name], left), workdir)
            print(f"[gpu_suite] {name}: {record['status']} in {record['seconds']:.1f} s", flush=True)
            report["steps"][name] = record
            if name == "env" and record["status"] == "ok":
                report.update({k: record["result"][k] for k in ("gpu_name", "torch", "torchvision")})
            report["figures"], report["targets"] = figures_and_targets(report["steps"], config)
            report["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_report(out, report)
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    report["out"] = out
    write_report(out, report)
    return report


def main(args: argparse.Namespace) -> Dict[str, Any]:
    if args.run_step:  # a child: one in-process step
        with open(args.config) as f:
            config = json.load(f)
        result = IN_PROCESS_STEPS[args.run_step](config)
        with open(args.step_out, "w") as f:
            json.dump(result, f)
        return result
    report = run_suite(args)
    print(f"[gpu_suite] wrote {report['out']}", flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
