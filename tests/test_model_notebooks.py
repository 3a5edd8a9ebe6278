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


# ---- The exercises of notebooks 30 and 32, and what notebooks 23-32 claim -----------------------------------

NOTEBOOKS = CHECKPOINT.parent.parent


def _text(name: str, cell_type: str | None = None, outputs: bool = False) -> str:
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    parts = []
    for c in cells:
        if cell_type is None or c["cell_type"] == cell_type:
            parts.append("".join(c["source"]))
        if outputs:
            for o in c.get("outputs", []):
                parts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_notebook_exercises_pass_their_checkers_and_stubs_are_reported(capsys):
    import pytest

    from helpers.model.checks import check_accept_draft, check_mtp_depth
    from helpers.teaching.checks import CheckFailure

    for name, function, checker in (("30_model_assemble.ipynb", "mtp_depth", check_mtp_depth),
                                    ("32_model_generate.ipynb", "accept_draft", check_accept_draft)):
        assert checker(getattr(load_notebook(name), function)) is None
        assert f"✓ {function} passes" in capsys.readouterr().out
        with pytest.raises(CheckFailure, match="still the exercise stub"):
            checker(getattr(load_notebook(name, exercise=True), function))


def test_model_notebooks_draw_and_compare_what_the_brief_of_each_section_says():
    assert "draw_model(config)" in _text("30_model_assemble.ipynb", "code")
    nb31 = _text("31_model_train.ipynb")
    assert "class_expert_information(initial_counts)" in nb31 and "for the first 10T tokens" in nb31 and "4.8T" in nb31
    nb32 = _text("32_model_generate.ipynb", "markdown")
    assert "85% and 90%" in nb32 and "§5.4.3" in nb32


def test_maxvio_narrative_matches_the_checkpoint_record():
    """Notebook 31 says one MoE layer stays unbalanced for about the first fifth of the run: the record shows it."""
    record = json.loads((CHECKPOINT / "training.json").read_text())
    layer2 = record["max_vio_every_10"][1]
    fifth = len(layer2) // 5
    assert sum(layer2[:fifth]) / fifth > 1.5 and sum(layer2[fifth:]) / (len(layer2) - fifth) < 0.5
    assert "stays low for the rest of the run (compare the peak" not in _text("31_model_train.ipynb", "markdown")


def test_track_boundaries_and_paper_attributions_in_23_and_24():
    nb24 = _text("24_mla_at_real_scale.ipynb", "markdown")
    assert "1/57" not in nb24 and "2.25 groups" in nb24 and "93.3%" in nb24
    assert "MLA track (notebooks 20-24)" in nb24 and "25_dsa_sparse_attention.ipynb" in nb24
    nb23 = _text("23_mla_weight_absorption.ipynb", "markdown")
    assert "(a later track)" not in nb23 and "MLA track (20-24)" in nb23


def test_no_internal_words_in_notebooks_23_to_32():
    import re

    for name in ("23_mla_weight_absorption.ipynb", "24_mla_at_real_scale.ipynb", "30_model_assemble.ipynb",
                 "31_model_train.ipynb", "32_model_generate.ipynb"):
        text = _text(name, outputs=True)
        for word in (r"\bissues?\b", r"\bgoals?\b", r"NOT met"):
            assert not re.search(word, text), (name, word)
