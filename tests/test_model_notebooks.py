"""Notebooks 30-32 use helpers.model's own classes; the committed checkpoint loads and matches its record."""

import json
import pathlib

import torch
from nbload import load_notebook

import helpers.model
from helpers.model.hf import load_pretrained, pretrained_metadata

CHECKPOINT = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "results" / "tiny_deepseek_v3"


def test_notebooks_import_the_helpers_model():
    for name in ("30_model_assemble.ipynb", "31_model_train.ipynb", "32_model_generate.ipynb"):
        ns = load_notebook(name)
        assert ns.DeepSeekV3 is helpers.model.DeepSeekV3, name


def test_committed_checkpoint_is_small_recorded_and_loads():
    files = {f.name: f.stat().st_size for f in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(files)
    assert sum(files.values()) < 30e6
    record = json.loads((CHECKPOINT / "training.json").read_text())
    assert record["command"].startswith("python -m helpers.train") and "seed" in record and record["seconds"] > 0
    meta = pretrained_metadata(CHECKPOINT)
    assert meta["seed"] == str(record["seed"]) and float(meta["final_val_loss"]) == round(record["final_val_loss"], 4)
    model = load_pretrained(CHECKPOINT)
    assert len(model.mtp) == 1
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    assert out.shape == (1, 8)


def test_committed_checkpoint_readme_is_generated_from_its_record():
    from helpers.model.train import readme_text

    assert (CHECKPOINT / "README.md").read_text() == readme_text(CHECKPOINT), (
        "regenerate it: python -m helpers.model.train readme notebooks/results/tiny_deepseek_v3")
