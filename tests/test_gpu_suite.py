"""bench/gpu_suite.py: one JSON of every figure; steps time-boxed and failure-tolerant; targets judged
only on a GPU in the target setting. The fast tests drive the orchestrator with stand-in steps; the slow
one runs ``bash bench/gpu_suite.sh --device cpu --tiny`` for real and checks the JSON's keys and types."""

import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpu_suite  # noqa: E402

ROOT = gpu_suite.ROOT
STATUSES = {"ok", "failed", "timeout", "missing", "skipped"}


def suite_args(*argv):
    return gpu_suite.get_args_parser().parse_args(list(argv))


def gpu_config(tiny=False):
    return gpu_suite.resolve_config(suite_args("--device", "cuda", *(["--tiny"] if tiny else [])))


def ok(result):
    return {"status": "ok", "seconds": 1.0, "error": None, "result": result}


def test_config_defaults_and_checks():
    config = gpu_config()
    assert (config["input_dim"], config["batch_size"], config["iters"], config["warmup"]) == (600, 24, 50, 10)
    assert config["basenet"] == "resnet50" and config["anchor_type"] == "pdf9" and config["amp"] == "bf16"
    tiny = gpu_config(tiny=True)
    assert (tiny["input_dim"], tiny["batch_size"], tiny["basenet"]) == (128, 2, "resnet18")
    with pytest.raises(SystemExit, match="--input_dim must be >= 128"):
        gpu_suite.resolve_config(suite_args("--device", "cpu", "--input_dim", "64"))
    with pytest.raises(SystemExit, match="--iters must be >= 1"):
        gpu_suite.resolve_config(suite_args("--device", "cpu", "--iters", "-1"))


def test_figures_and_targets_judged_on_a_gpu_only():
    steps = {
        "train_ours": ok({"images_per_s": 180.0, "peak_memory_gib": 20.0, "first_iter_s": 3.0}),
        "train_torchvision": ok({"images_per_s": 120.0, "peak_memory_gib": 22.0, "first_iter_s": 3.0}),
        "train_ours_compiled": ok({"images_per_s": 140.0, "peak_memory_gib": 19.0, "first_iter_s": 60.0}),
        "memory_ours": ok({"peak_memory_gib": 25.5}),
        "memory_torchvision": ok({"peak_memory_gib": 30.0}),
        "pytest_cuda": {
            "status": "failed",
            "seconds": 9.0,
            "error": "failed: x",
            "result": {"passed": 9, "failed": 1, "errors": 0, "skipped": 0, "failed_tests": ["x"]},
        },
        "components": ok({"loss_ours_mbox_ohem": 0.01, "device": "cuda"}),
        "data_loader": {"status": "missing", "seconds": 0.0, "error": "absent", "result": None},
    }
    figures, targets = gpu_suite.figures_and_targets(steps, gpu_config())
    assert figures["ratio_train_ours_vs_torchvision"] == 1.5
    assert figures["ratio_train_ours_compiled_vs_torchvision"] == round(140 / 120, 3)
    assert figures["ratio_memory_ours_vs_torchvision"] == 0.85
    assert (figures["pytest_cuda_passed"], figures["pytest_cuda_failed"]) == (9, 1)
    assert figures["components.loss_ours_mbox_ohem"] == 0.01 and "components.device" not in figures
    assert targets == {
        "train_600px_amp_ge_150_images_per_s": True,
        "train_600px_amp_ge_150_images_per_s_compiled": False,
        "train_ahead_of_torchvision": True,
        "train_compiled_ahead_of_torchvision": True,
        "coco_batch24_within_24gb": False,  # 25.5 GiB
    }
    # A missing figure is not judged; neither is a --tiny or CPU run.
    del steps["train_torchvision"]
    _, targets = gpu_suite.figures_and_targets(steps, gpu_config())
    assert targets["train_ahead_of_torchvision"] is None and targets["train_600px_amp_ge_150_images_per_s"]
    _, targets = gpu_suite.figures_and_targets(steps, gpu_config(tiny=True))
    assert set(targets.values()) == {None}


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"/></testsuite></testsuites>'
    )
    assert gpu_suite.junit_counts(str(xml)) == {
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "failed_tests": ["tests.test_cuda::test_b"],
    }


def test_run_command_timeout_kills_the_whole_process_group():
    start = time.perf_counter()
    status, code, _, _ = gpu_suite.run_command(["bash", "-c", "sleep 30 & sleep 30"], timeout_s=1)
    assert status == "timeout" and code is None and time.perf_counter() - start < 10
    status, code, stdout, _ = gpu_suite.run_command([sys.executable, "-c", "print('{\"a\": 1}')"], 30)
    assert (status, code, gpu_suite.last_json_line(stdout)) == ("ok", 0, {"a": 1})
    status, code, _, stderr = gpu_suite.run_command([sys.executable, "-c", "raise SystemExit('boom')"], 30)
    assert (status, code) == ("failed", 1) and "boom" in stderr


def test_suite_goes_on_after_failures_and_writes_one_json(tmp_path, monkeypatch, capsys):
    """Stand-in steps: one fails, one times out; the others still run, the budget skips the rest, and the
    JSON file is what is printed last."""
    calls = []

    def fake_run_step(name, config, timeout_s, workdir):
        calls.append((name, timeout_s))
        if name == "env":
            return ok({"gpu_name": "Fake GPU", "torch": "t", "torchvision": "tv"})
        if name == "train_ours":
            return {"status": "failed", "seconds": 0.1, "error": "exit 1: CUDA out of memory", "result": None}
        if name == "train_torchvision":
            return {"status": "timeout", "seconds": 0.1, "error": "timed out after 90 s", "result": None}
        if name == "memory_ours":
            time.sleep(1.2)  # spends the budget: the steps after it are not started
        return ok({"peak_memory_gib": 10.0})

    monkeypatch.setattr(gpu_suite, "run_step", fake_run_step)
    out = tmp_path / "suite.json"
    report = gpu_suite.main(suite_args("--device", "cuda", "--out", str(out), "--budget_s", "11"))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == report and json.loads(out.read_text()) == {k: v for k, v in report.items()}
    assert [name for name, _ in calls] == ["env", "train_ours", "train_torchvision", "memory_ours"]
    assert all(timeout <= 11 for _, timeout in calls)  # min(box, what is left of the budget)
    assert report["gpu_name"] == "Fake GPU" and report["torch"] == "t"
    assert report["steps"]["train_ours"]["error"].endswith("CUDA out of memory")
    assert report["steps"]["train_torchvision"]["status"] == "timeout"
    assert report["steps"]["memory_ours"]["status"] == "ok"
    skipped = [name for name, step in report["steps"].items() if step["status"] == "skipped"]
    assert skipped == list(gpu_suite.STEPS[4:])
    assert report["figures"]["memory_ours_peak_gib"] == 10.0
    assert report["targets"]["coco_batch24_within_24gb"] is True
    assert report["targets"]["train_ahead_of_torchvision"] is None


def test_data_steps_are_missing_without_bench_data(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "ROOT", str(tmp_path))  # a tree without bench/bench_data.py
    record = gpu_suite.run_step("data_loader", gpu_config(tiny=True), 10, str(tmp_path))
    assert record["status"] == "missing" and "bench_data.py" in record["error"]


def check_report_types(report):
    assert set(report) >= {"suite", "date", "device", "gpu_name", "torch", "torchvision", "tiny", "budget_s"}
    assert set(report) >= {"elapsed_s", "config", "steps", "figures", "targets"}
    assert list(report["steps"]) == list(gpu_suite.STEPS)
    for name, step in report["steps"].items():
        assert step["status"] in STATUSES, name
        assert isinstance(step["seconds"], float) and (step["error"] is None) == (step["status"] == "ok")
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in report["figures"].values())
    assert all(v is None or isinstance(v, bool) for v in report["targets"].values())


@pytest.mark.slow
def test_tiny_cpu_suite_runs_every_step(tmp_path):
    """The real thing on the CPU (minutes on a shared 2-core machine; seconds per step on an idle one)."""
    out = tmp_path / "suite.json"
    result = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report  # printed last
    check_tiny_cpu_report(report)


def check_tiny_cpu_report(report):
    """What a --device cpu --tiny run must give (also applied to the run quoted in BENCHMARKS.md)."""
    check_report_types(report)
    steps = report["steps"]
    assert report["device"] == "cpu" and report["gpu_name"] is None and report["torch"]
    for name in ("env", "train_ours", "train_torchvision", "train_ours_compiled", "memory_ours"):
        assert steps[name]["status"] == "ok", (name, steps[name]["error"])
    assert report["figures"]["train_ours_images_per_s"] > 0
    assert report["figures"]["train_torchvision_images_per_s"] > 0
    assert steps["train_ours_compiled"]["result"]["compile_backend"] == "eager"
    assert steps["pytest_cuda"]["result"]["skipped"] == report["figures"]["pytest_cuda_skipped"] > 0
    assert steps["pytest_cuda"]["result"]["failed"] == 0
    bench_data = os.path.isfile(os.path.join(ROOT, "bench", "bench_data.py"))
    assert steps["data_loader"]["status"] == ("ok" if bench_data else "missing")
    assert steps["components"]["status"] == "ok" and "components.loss_ours_mbox_ohem" in report["figures"]
    assert set(report["targets"].values()) == {None}  # a tiny CPU run judges no target


def test_gpu_paths_import_without_the_packages_the_gpu_image_lacks():
    """The GPU machine's image has torch, torchvision, OpenCV and tqdm but not pycocotools, tensorboardX,
    visdom, faster-coco-eval or matplotlib: the suite's modules and what its steps import must load (and
    build our model) with those blocked. A module that imports one of them at the top fails here."""
    blocked = ["pycocotools", "tensorboardX", "visdom", "faster_coco_eval", "matplotlib"]
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, "bench")
import gpu_suite, gpu_suite_steps, train, engine, evaluate, models, training  # noqa
for name in {blocked!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let " + name + " through")
print("imported")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("imported")
