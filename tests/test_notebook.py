"""The notebook as committed: clean, in the documented order, with short cells.

Executing it is nbval's job (`make test` runs it on the tiny pipelines).
"""

from __future__ import annotations

import json

from conftest import ROOT

NOTEBOOK = ROOT / "blip-diffusion-subject-generation.ipynb"
SECTIONS = [
    "Prerequisites",
    "Configuration",
    "Load the PyTorch pipelines",
    "Example images",
    "Run the original PyTorch model",
    "Convert the models to OpenVINO IR",
    "Q-Former",
    "Text encoder",
    "UNet",
    "VAE decoder",
    "ControlNet",
    "Select the inference device",
    "Run the OpenVINO pipeline",
    "Compare PyTorch and OpenVINO",
    "Compress the pipeline with NNCF",
    "Interactive demo",
]
MAX_CODE_LINES = 12


def _cells():
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_committed_without_outputs():
    dirty = [i for i, cell in enumerate(_cells()) if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"])]
    assert not dirty, f"cells {dirty} have outputs: clear them before committing (outputs of tiny random weights mislead)"


def test_sections_in_order_and_linked_from_the_table_of_contents():
    headings = [
        line.lstrip("#").strip()
        for cell in _cells()
        if cell["cell_type"] == "markdown"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith("## ") or line.startswith("### ")
    ]
    assert headings == SECTIONS
    contents = "".join(_cells()[0]["source"])
    for section in SECTIONS:
        assert f"(#{section.replace(' ', '-')})" in contents, f"no link to {section!r} in the table of contents"


def test_code_cells_stay_short_and_use_the_helper():
    code = ["".join(cell["source"]) for cell in _cells() if cell["cell_type"] == "code"]
    long_cells = [source.splitlines()[0] for source in code if len(source.splitlines()) > MAX_CODE_LINES]
    assert not long_cells, f"cells longer than {MAX_CODE_LINES} lines belong in blip_helper.py: {long_cells}"
    assert not any(line.lstrip().startswith(("def ", "class ")) for source in code for line in source.splitlines())


def test_model_ids_come_from_the_environment_with_hub_defaults():
    source = "".join("".join(cell["source"]) for cell in _cells())
    for variable, default in [
        ("BLIP_DIFFUSION_MODEL", "Salesforce/blipdiffusion"),
        ("BLIP_DIFFUSION_CONTROLNET_MODEL", "Salesforce/blipdiffusion-controlnet"),
    ]:
        assert f'os.environ.get("{variable}", "{default}")' in source
