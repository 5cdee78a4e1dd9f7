"""The example workflows: current with the chain linfusion runs, and the UI format the same graph as the
API format."""

from __future__ import annotations

import importlib
import json
import os

import pytest


@pytest.fixture(scope="module")
def examples(pack):
    return importlib.import_module(f"{pack.__name__}.example_workflows")


def test_workflow_files_are_current(examples):
    """Regenerate with LINFUSION_WRITE_WORKFLOWS=1 after changing the generator or linfusion's chain."""
    if os.environ.get("LINFUSION_WRITE_WORKFLOWS") == "1":
        examples.write()
    expected = examples.workflows()
    on_disk = {path.name for path in examples.FOLDER.glob("*.json")}
    assert on_disk == set(expected)
    for name, workflow in expected.items():
        assert (examples.FOLDER / name).read_text() == examples.render(workflow), name


@pytest.mark.parametrize(
    "name, stages",
    [
        ("sdedit-sd15-4k", [(512, None, 25), (1024, 0.4, 10), (2048, 0.25, 6), (4096, 0.1, 2)]),
        ("sdedit-sdxl-16k", [(1024, None, 25), (2048, 0.32, 8), (4096, 0.24, 6), (8192, 0.16, 4),
                             (16384, 0.08, 2)]),
    ],
)  # fmt: skip
def test_chain_stages_are_linfusions(examples, name, stages):
    """Sizes, denoise and steps per stage: what ``linfusion generate --mode sdedit`` runs (25 steps)."""
    prompt = json.loads((examples.FOLDER / f"{name}.api.json").read_text())
    samplers = [node["inputs"] for node in prompt.values() if node["class_type"] == "KSampler"]
    sizes = [node["inputs"]["width"] for node in prompt.values()
             if node["class_type"] in ("EmptyLatentImage", "ImageScale")]  # fmt: skip
    assert sizes == [side for side, _, _ in stages]
    assert [s["denoise"] for s in samplers] == [1.0 if d is None else d for _, d, _ in stages]
    assert [s["steps"] for s in samplers] == [steps for _, _, steps in stages]
    decoders = [node for node in prompt.values() if node["class_type"] == "LinFusionVAEDecode"]
    assert len(decoders) == len(stages)  # every decode is the exact tiled one


@pytest.mark.parametrize("name", ["sdedit-sd15-8k", "sdedit-sdxl-4k"])
def test_ui_format_is_the_api_graph(examples, name):
    api = json.loads((examples.FOLDER / f"{name}.api.json").read_text())
    ui = json.loads((examples.FOLDER / f"{name}.json").read_text())
    assert {str(node["id"]): node["type"] for node in ui["nodes"]} == {
        k: v["class_type"] for k, v in api.items()
    }
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        for slot in node["inputs"]:
            _, source, source_slot, target, _, kind = links[slot["link"]]
            assert inputs[slot["name"]] == [str(source), source_slot] and target == node["id"]
        widgets = [value for key, value in zip(examples.WIDGETS[node["type"]], node["widgets_values"])
                   if key != "control_after_generate"]  # fmt: skip
        assert widgets == [
            inputs[key] for key in examples.WIDGETS[node["type"]] if key != "control_after_generate"
        ]
