"""utils/errors.py: user errors become one message and exit status 2; bugs keep their traceback."""

import argparse
import subprocess
import sys

import pytest

from utils.errors import UserError, run_cli


def _parser():
    p = argparse.ArgumentParser(prog="tool.py")
    p.add_argument("--what", default="user")
    return p


def _main(args):
    if args.what == "user":
        raise UserError("train.json: not a valid JSON annotation file")
    if args.what == "missing":
        open("/nonexistent/dir/file.json")
    raise RuntimeError("a bug")


def test_user_error_is_a_message_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("FPN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(_main, _parser(), ["--what", "user"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "tool.py: error: train.json: not a valid JSON annotation file\n"


def test_missing_file_names_the_file(capsys, monkeypatch):
    monkeypatch.delenv("FPN_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(_main, _parser(), ["--what", "missing"])
    assert e.value.code == 2
    assert "'/nonexistent/dir/file.json'" in capsys.readouterr().err


def test_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(_main, _parser(), ["--what", "bug"])


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


def test_script_prints_no_traceback(tmp_path):
    # A real script on a missing annotation file: one line on stderr, no "Traceback".
    out = subprocess.run(
        [sys.executable, "kmeans_for_anchors.py", "--dataset", "nope", "--data_root", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr
