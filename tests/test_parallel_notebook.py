"""Notebook 14: its V3 figures come from the released config; its answer key and headers are in place."""

import re

import nbformat
from nbload import NOTEBOOKS, load_notebook

NAME = "14_moe_expert_parallelism.ipynb"


def test_nb14_exports_load():
    nb = load_notebook(NAME)
    assert nb.ExpertParallelMoE.__module__ == "helpers.parallel.layer"


def test_nb14_v3_numbers_are_the_released_config():
    from helpers.configs import deepseek_v3

    cfg = deepseek_v3()
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / NAME, 4).cells if c.cell_type == "code")
    match = re.search(r"hidden, inter, n_experts, moe_layers = \(?\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+) - (\d+)", source)
    assert match, "the V3 constants cell changed; update this test"
    h, i, e, layers, dense = map(int, match.groups())
    assert (h, i, e, layers, dense) == (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                        cfg.num_hidden_layers, cfg.first_k_dense_replace)


def test_nb14_has_an_answer_key_and_no_errors():
    nb = nbformat.read(NOTEBOOKS / NAME, 4)
    assert any("<!-- BEGIN ANSWER -->" in c.source for c in nb.cells if c.cell_type == "markdown")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not any(o.output_type == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


def test_nb14_prose_cites_the_right_sections_and_leads_on():
    markdown = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / NAME, 4).cells if c.cell_type == "markdown")
    assert "§3.3.3" in markdown and "§3.3.2" not in markdown  # FP8 dispatch: "Low-Precision Communication"
    assert r"\mathbf h'_t = \mathbf u_t +" in markdown  # V3 eq. 12 keeps the residual
    assert "16-way pipeline parallelism" in markdown and "by replication by replication" not in markdown
    assert "(20_mla_mha_kv_cache.ipynb)" in markdown.split("## Recap")[-1]


def test_nb14_replication_keeps_the_node_limit():
    nb = nbformat.read(NOTEBOOKS / NAME, 4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "hierarchical plan" in text and "nodes per token at most 1" in text
    assert "every expert's copies on one node: True" in text
