"""`memopt inspect` end to end, and its one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memopt.cli.main import main

ZOO = str(Path(__file__).with_name("zoo.py"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_text_report(capsys):
    code, out, _ = run_cli(capsys, "inspect", f"{ZOO}:conv_bn", "--input", "2x3x15x13")
    assert code == 0
    assert "graphs: 1, graph breaks: 0" in out
    assert "conv2d x3" in out
    assert "batch_norm x2" in out
    assert "parameters: 12 tensors" in out
    assert "estimated peak" in out


def test_inspect_json_train_and_plot(capsys, tmp_path):
    plot = tmp_path / "live.png"
    code, out, _ = run_cli(
        capsys, "inspect", f"{ZOO}:mlp", "--input", "4,17", "--train", "--json", "--plot", str(plot),
        "--options", '{"memory_budget": 0.5}',
    )
    assert code == 0
    result = json.loads(out)
    assert result["mode"] == "train"
    assert result["options"]["memory_budget"] == 0.5
    assert result["graph_count"] == 1
    (graph,) = result["graphs"]
    assert graph["training"] and graph["saved_activations"] > 0
    assert result["saved_activation_bytes"] == graph["saved_activation_bytes"] > 0
    assert result["parameter_bytes"] == 4 * (17 * 64 + 64 + 64 * 64 + 64 + 64 * 5 + 5)
    assert len(graph["timeline_before"]) == graph["nodes_before"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_path_without_extension_and_without_matplotlib(capsys, tmp_path, monkeypatch):
    code, out, _ = run_cli(capsys, "inspect", f"{ZOO}:mlp", "--input", "4,17", "--plot", str(tmp_path / "live"))
    assert code == 0 and out.strip().endswith(f"plot written to {tmp_path / 'live.png'}")
    assert (tmp_path / "live.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    code, out, err = run_cli(capsys, "inspect", f"{ZOO}:mlp", "--input", "4,17", "--plot", str(tmp_path / "again.png"))
    assert code == 2 and out == "" and "--plot needs matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "again.png").exists()


def test_inspect_reports_graph_breaks_with_reasons(capsys):
    code, out, _ = run_cli(capsys, "inspect", f"{ZOO}:graph_break_net", "--input", "4x8", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["graph_break_count"] == 1
    assert result["graph_count"] == 2
    (info,) = result["graph_breaks"]
    assert "item" in info["reason"]
    assert "zoo.py" in info["location"]


def test_inspect_module_target_with_integer_inputs(capsys):
    code, out, _ = run_cli(capsys, "inspect", "memopt.demo:demo_model", "--input", "2x3x16x16")
    assert code == 0, out
    assert "scaled_dot_product_attention x2" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no_colon", "--input", "2x3"], "must look like 'package.module:factory'"),
        (["inspect", "missing_file.py:f", "--input", "2x3"], "does not exist"),
        (["inspect", "no_such_module_xyz:f", "--input", "2x3"], "cannot import module"),
        (["inspect", f"{ZOO}:absent", "--input", "2x3"], "has no attribute 'absent'"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x"], "input shape '2x'"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17:float8"], "unknown dtype 'float8'"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--dtype", "int64"], "floating dtype"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--options", "{bad json"], "not valid JSON"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--options", "[1]"], "JSON object"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--options", '{"fast": 1}'], "valid options are"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x5"], "does not run on these inputs: RuntimeError: mat1 and mat2"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--options", '{"step_rehash": {"interval": 3}}'],
         "option 'step_rehash' wraps a denoiser's calls"),
        (["inspect", f"{ZOO}:mlp", "--input", "2x17", "--plot", "/no_such_memopt_folder/live.png"],
         "cannot write the plot '/no_such_memopt_folder/live.png': folder '/no_such_memopt_folder' does not exist"),
        (["inspect", f"{ZOO}:mlp_inputs", "--input", "2x17"], "not an nn.Module"),
        (["inspect", f"{ZOO}:mlp", "--input", "99999999999999999999x17"], "sizes must be below 2**63"),
        (["inspect", f"{ZOO}:mlp", "--input", "1000000x1000000x1000"], "cannot make the input '1000000x1000000x1000'"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


MODELS_HERE = """
import torch.nn as nn

def emb():
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 4))
"""


def test_module_target_in_the_working_directory(capsys, tmp_path, monkeypatch):
    """``module:factory`` finds the working directory's modules, as ``python -m`` would; float
    inputs into an embedding get a hint about integer inputs."""
    (tmp_path / "memopt_test_models_here.py").write_text(MODELS_HERE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI may add the folder: undone after the test
    code, out, _ = run_cli(capsys, "inspect", "memopt_test_models_here:emb", "--input", "2x5:int64")
    assert code == 0
    assert "embedding x1" in out
    code, out, err = run_cli(capsys, "inspect", "memopt_test_models_here:emb", "--input", "2x5")
    assert code == 2 and out == ""
    assert "'indices'" in err and "--input 8x128:int64" in err
    code, _, err = run_cli(capsys, "inspect", "memopt_test_models_here_absent:emb", "--input", "2x5")
    assert code == 2 and "No module named 'memopt_test_models_here_absent'" in err


def test_compile_errors_name_their_innermost_cause():
    from memopt.cli.main import _root_cause

    try:
        try:
            raise ValueError("memopt option 'x' must be ...\nmore")
        except ValueError as inner:
            raise RuntimeError("backend='memopt' raised:\n") from inner
    except RuntimeError as error:
        assert _root_cause(error) == "ValueError: memopt option 'x' must be ..."


def test_demo_repeat_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--repeat", "0"])
    assert exit_info.value.code == 2
    assert "--repeat: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_console_script_is_installed():
    """The `memopt` command exists and reports bad targets without a traceback."""
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("memopt")), "inspect", "bad", "--input", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "must look like" in completed.stderr
    assert "Traceback" not in completed.stderr
