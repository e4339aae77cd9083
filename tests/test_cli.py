"""The command line (`python blip_helper.py convert|generate|benchmark`) on tiny random pipelines.

Most tests call `blip_helper.main()` in this process, which saves a Python start-up (torch, diffusers
and OpenVINO imports) per test; the benchmark and the error checks run the real script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, random_image
from PIL import Image

import blip_helper

SCRIPT = ROOT / "blip_helper.py"


def run_main(capsys, *args) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `blip_helper.py ARGS`, run in this process."""
    try:
        status = blip_helper.main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse: --help and bad arguments
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def run_script(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def generate_args(ir_dir, tmp_path, *extra) -> list:
    reference = tmp_path / "reference.png"
    random_image(0).save(reference)
    return [
        "generate", "--models", ir_dir, "--reference", reference, "--source-category", "dog", "--target-category", "dog",
        "--prompt", "swimming underwater", "--steps", "2", "--height", "48", "--width", "64", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- help

HELP = {
    "": ["convert", "generate", "benchmark"],
    "convert": ["--model", "--controlnet-model", "--output", "--int8"],
    "generate": ["--models", "--reference", "--source-category", "--target-category", "--prompt", "--control",
                 "--conditioning", "--seed", "--steps", "--guidance", "--height", "--width", "--negative", "--device", "--output"],
    "benchmark": ["--model", "--controlnet-model", "--spec", "--steps", "--height", "--width", "--work-dir", "--json"],
}  # fmt: skip


@pytest.mark.parametrize("command", HELP)
def test_help_of_each_command(command, capsys):
    status, out, err = run_main(capsys, *[command] * bool(command), "--help")
    assert status == 0 and not err
    assert out.startswith(f"usage: blip_helper.py {command}".rstrip())
    for option in HELP[command]:
        assert option in out
    assert "benchmark-worker" not in out  # the benchmark's internal command stays out of sight


# ------------------------------------------------------------------------------------------ convert


def test_convert_writes_a_loadable_ir_directory(tiny_dirs, ir_fp16, tmp_path, capsys):
    # A copy of ir_fp16 (converted from the same pipelines) without its text encoder and pipeline
    # config: the command converts the missing part and keeps the others, as convert_pipeline does,
    # which spares the test a whole second conversion.
    output = tmp_path / "ir"
    shutil.copytree(ir_fp16, output, ignore=shutil.ignore_patterns("model_cache"))
    shutil.rmtree(output / "text_encoder")
    (output / "pipeline_config.json").unlink()
    status, out, err = run_main(capsys, "convert", "--model", tiny_dirs[0], "--controlnet-model", tiny_dirs[1], "--output", output)
    assert status == 0, err
    assert f"Wrote {output}" in out and "text_encoder" in out and "MiB" in out
    pipeline = blip_helper.OVBlipDiffusionPipeline.from_pretrained(output)
    assert pipeline.has_controlnet


def test_convert_int8_writes_only_the_int8_ir(tiny_dirs, tmp_path, capsys):
    output = tmp_path / "int8"
    status, out, err = run_main(
        capsys, "convert", "--model", tiny_dirs[0], "--controlnet-model", tiny_dirs[1], "--output", output,
        "--int8", "--int8-subset-size", "4", "--calibration-size", "64",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads((output / "unet" / "config.json").read_text())["quantization"] == blip_helper.ACTIVATION_SCHEME
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # the FP16 IR it came from is gone
    assert blip_helper.OVBlipDiffusionPipeline.from_pretrained(output).has_controlnet


# ----------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("control", [None, "canny", "scribble"])
def test_generate_saves_an_image_of_the_requested_size(control, ir_fp16, tmp_path, capsys):
    output = tmp_path / "out" / "image.png"
    extra = ["--output", output]
    if control:
        conditioning = tmp_path / "conditioning.png"
        random_image(5, size=(80, 60)).save(conditioning)
        extra += ["--control", control, "--conditioning", conditioning]
    status, out, err = run_main(capsys, *generate_args(ir_fp16, tmp_path, *extra))
    assert status == 0, err
    assert f"Saved {output} (64x48)" in out
    with Image.open(output) as image:
        assert image.size == (64, 48) and image.format == "PNG"


# ------------------------------------------------------------------------------------------- errors

# Bad arguments: argparse's status 2. Failures (missing files, models, a ControlNet): status 1.
BAD_COMMANDS = {
    "no command": ([], 2, "required: "),
    "unknown command": (["render"], 2, "invalid choice: 'render'"),
    "height not a multiple of 8": (["GENERATE", "--height", "50", "--output", "o.png"], 2, "argument --height: must be a positive multiple of 8"),
    "zero steps": (["GENERATE", "--steps", "0", "--output", "o.png"], 2, "argument --steps: must be an integer >= 1"),
    "negative guidance": (["GENERATE", "--guidance", "-1", "--output", "o.png"], 2, "argument --guidance: must be a number >= 0"),
    "unknown control": (["GENERATE", "--control", "sobel", "--output", "o.png"], 2, "argument --control: invalid choice: 'sobel'"),
    "control without image": (["GENERATE", "--control", "canny", "--output", "o.png"], 2, "argument --control: needs --conditioning"),
    "image without control": (["GENERATE", "--conditioning", "c.png", "--output", "o.png"], 2, "argument --conditioning: needs --control"),
    "output not an image": (["GENERATE", "--output", "o.txt"], 2, "argument --output: 'o.txt' has no image extension"),
    "no output": (["GENERATE"], 2, "required: --output"),
    "model and spec": (["benchmark", "--model", "m", "--spec", "tiny"], 2, "argument --spec: not allowed with argument --model"),
    "controlnet without model": (["benchmark", "--controlnet-model", "m"], 2, "argument --controlnet-model: needs --model"),
    "missing reference": (["GENERATE", "--reference", "MISSING", "--output", "o.png"], 1, "--reference: no image file at"),
    "reference not an image": (["GENERATE", "--reference", ROOT / "README.md", "--output", "o.png"], 1, "is not an image file"),
    "missing IR directory": (["GENERATE", "--models", "MISSING", "--output", "o.png"], 1, "No IR directory at"),
    "control without ControlNet": (["GENERATE", "--models", "BASE_ONLY", "--control", "canny", "--conditioning", "REFERENCE", "--output", "o.png"],
                                   1, "--control needs an IR directory with a ControlNet"),
    "missing model": (["convert", "--model", "./no/such/model", "--output", "ir"], 1, "Could not load the model './no/such/model'"),
    "missing benchmark model": (["benchmark", "--model", "./no/such/model"], 1, "Could not load the model './no/such/model'"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_COMMANDS)
def test_bad_commands_fail_with_one_line_naming_the_problem(case, ir_fp16, ir_base_only, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs, if any were written, land here
    args, expected_status, expected_message = BAD_COMMANDS[case]
    if args[:1] == ["GENERATE"]:
        args = generate_args(ir_fp16, tmp_path) + args[1:]
    placeholders = {"MISSING": tmp_path / "missing", "BASE_ONLY": ir_base_only, "REFERENCE": tmp_path / "reference.png"}
    args = [placeholders.get(arg, arg) if isinstance(arg, str) else arg for arg in args]
    status, out, err = run_main(capsys, *args)
    assert status == expected_status
    assert err.count("\n") == 1 and err.startswith("blip_helper.py") and ": error: " in err, err
    assert expected_message in err
    assert not list(tmp_path.glob("o.*"))


def test_the_script_reports_a_failure_in_one_line_without_traceback(tmp_path):
    # The in-process tests above cover the messages; this one covers `sys.exit(main())` (one case:
    # each run of the script costs a Python start-up with torch, diffusers and OpenVINO).
    process = run_script("convert", "--model", tmp_path / "no-such-model", "--output", tmp_path / "ir", timeout=300)
    assert process.returncode == 1
    assert process.stderr.startswith("blip_helper.py convert: error: Could not load the model")
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr, process.stderr


# ---------------------------------------------------------------------------------------- benchmark


def test_benchmark_quick_mode_on_tiny_pipelines(tmp_path):
    json_path = tmp_path / "results.json"
    process = run_script(
        "benchmark", "--spec", "tiny", "--steps", "2", "--height", "64", "--width", "64",
        "--int8-subset-size", "4", "--calibration-size", "64",
        "--work-dir", tmp_path / "work", "--json", json_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(json_path.read_text())

    assert results["failures"] == {}
    assert results["settings"] | {"model": None, "controlnet_model": None} == {
        "steps": 2, "height": 64, "width": 64, "seed": blip_helper.DEFAULT_SEED, "guidance": 7.5, "device": "CPU",
        "model": None, "controlnet_model": None, "spec": "tiny", "int8_subset_size": 4, "calibration_size": 64,
    }  # fmt: skip
    machine = results["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["ram_bytes"] > 0
    assert machine["versions"]["openvino"] and machine["versions"]["torch"]

    conversion = results["conversion"]
    assert conversion["convert_s"] > 0 and conversion["peak_rss_bytes"] > 0
    assert set(conversion["ir_sizes"]) == {*blip_helper.PART_NAMES, "total"}

    configurations = results["configurations"]
    assert list(configurations) == list(blip_helper.BENCHMARK_CONFIGURATIONS)
    measured = list(configurations)
    assert results["compression"]["compress_s"] > 0
    for name in measured:
        row = configurations[name]
        for key in ("unet_step_s", "image_s", "controlnet_step_s", "controlnet_image_s"):
            assert row[key] > 0, (name, key)
        assert row["unet_step_s"] < row["image_s"] and row["controlnet_step_s"] < row["controlnet_image_s"]
        # PNDM makes 3 UNet calls for 2 steps; each one is timed.
        assert row["unet_steps_timed"] == row["controlnet_steps_timed"] == 3
        # The worker's own peak (the tiny models add little to the libraries' hundreds of MiB).
        assert 100 * 2**20 < row["peak_rss_bytes"] < 8 * 2**30, name
        if name.startswith("openvino"):
            assert row["compile_s"] > 0 and row["compile_from_cache_s"] > 0 and row["compile_filling_cache_s"] > 0
            assert row["compile_from_cache_peak_rss_bytes"] > 0 and row["compile_filling_cache_peak_rss_bytes"] > 0
            assert row["ir_size_bytes"] > 0 and row["inference_precision"]
    assert configurations["openvino"]["ir_size_bytes"] == conversion["ir_sizes"]["total"]
    for name in measured:
        assert results["ratios"][name]["pytorch-fp32"]["unet_step_speedup"] > 0
        assert results["ratios"][name]["pytorch-bf16"]["memory_ratio"] > 0
    assert results["ratios"]["pytorch-fp32"]["pytorch-fp32"]["image_speedup"] == 1

    report = process.stdout
    assert "| configuration | s / UNet step | s / image | s / image, ControlNet | peak memory, MiB | IR size, MiB" in report
    for label in ("PyTorch FP32", "PyTorch bf16 autocast", "OpenVINO, FP16 weights", "OpenVINO, INT8 weights", machine["cpu"]):
        assert label in report
    assert f"Results written to {json_path}" in report
