# Two commands for learners: `make lab` and `make test`. Everything else is for maintainers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install lab workshop test test-browser lint unit notebooks execute exercises site bench parallel-check capstone-results train train-v4 extension-results clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --no-compile -r requirements.txt
	touch $(STAMP)

# JupyterLab settings for every server of this venv: no first-start news prompt over the outputs.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_SETTINGS): helpers/teaching/lab_overrides.json $(STAMP)
	mkdir -p $(dir $@) && cp $< $@

install: $(STAMP) $(LAB_SETTINGS)  ## create .venv and install the pinned requirements

# JupyterLab refuses to run as root (containers) unless told it may. The server's root is the
# repository, so notebooks/ and exercises/ are both reachable. LAB_OPTS: extra server options
# (the browser test adds a port, a token and --no-browser; nothing else differs).
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_OPTS ?=
LAB := $(BIN)/jupyter lab $(LAB_FLAGS) --ServerApp.root_dir=. $(LAB_OPTS)

lab: install  ## open JupyterLab on the first notebook
	$(LAB) notebooks/00_why_deepseek_is_cheap.ipynb

workshop: exercises  ## write the exercise versions to exercises/ and open JupyterLab on them
	$(LAB) exercises/00_why_deepseek_is_cheap.ipynb

test: install lint  ## lint, unit tests, then nbval over every notebook
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

test-browser: install  ## JupyterLab in headless Chromium: Run All on notebooks, an exercise, the site (minutes)
	$(BIN)/python -m pytest tests/browser/lab_in_chromium.py -v

unit: install  ## unit tests only (fast)
	$(BIN)/python -m pytest tests

notebooks: install  ## nbval over the notebooks only
	$(BIN)/python -m pytest notebooks

execute: install  ## re-run every notebook in place, top to bottom, so committed outputs come from one clean run
	$(BIN)/python -m helpers.teaching.execute notebooks/[0-9]*.ipynb --times notebooks/results/execute_times.json --readme README.md

exercises: install  ## write the workshop versions (solutions replaced by stubs) to exercises/
	$(BIN)/python -m helpers.teaching.exercises notebooks exercises

site: install  ## the notebooks with their outputs as static HTML in build/site/ (index: README's table order)
	$(BIN)/python -m helpers.teaching.site --readme README.md --out build/site

train: install  ## train the miniature DeepSeek-V3 (2000 steps) and export it to notebooks/results/tiny_deepseek_v3/ (about 10 min on 2 idle cores)
	$(BIN)/python -m helpers.train --out notebooks/results/tiny_deepseek_v3

capstone-results: install  ## results that read the capstone checkpoint (run after make train): expert traffic, DSA warm-up
	$(BIN)/python -m helpers.parallel.capstone --out notebooks/results/traffic_capstone.json
	$(BIN)/python -m helpers.dsa.warmup --out notebooks/results/dsa_warmup.json

train-v4: install  ## train the miniature DeepSeek-V4 (AdamW and Muon) beside a 500-step V3 and compare them (about an hour on 2 cores)
	$(BIN)/python -m helpers.v4.train --threads 1 --steps 500 --eval-every 50 --out notebooks/results/tiny_deepseek_v4
	$(BIN)/python -m helpers.v4.train --threads 1 --steps 500 --eval-every 50 --optimizer muon \
		--record notebooks/results/v4_muon_training.json
	$(BIN)/python -m helpers.train --threads 1 --steps 500 --eval-every 50 --out build/v3_500
	cp build/v3_500/training.json notebooks/results/v4_v3_training.json
	$(BIN)/python -m helpers.v4.train compare

extension-results: install  ## the FP8 training comparison and the YaRN experiment that notebooks 33 and 26 plot (minutes)
	$(BIN)/python -m helpers.fp8.train --out notebooks/results/fp8_training.json
	$(BIN)/python -m helpers.mla.yarn_experiment --out notebooks/results/yarn_experiment.json

parallel-check: install  ## the expert-parallel layer on 2, 3 and 4 processes against one process
	for n in 2 3 4; do $(BIN)/python -m helpers.parallel check --nproc $$n || exit 1; done

bench: install  ## the MoE (with the compiled backend), MLA, DSA, capstone and V4 benchmarks (about 15 minutes; not part of the tests); saves medians, writes the README's tables
	$(BIN)/python -m helpers.bench moe --threads 2 --paths --save notebooks/results/bench_moe.json
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m helpers.bench moe --threads 2 --paths --no-backward \
		--save notebooks/results/bench_moe_passive.json
	$(BIN)/python -m helpers.bench moe --threads 2 --compiled --no-backward --sweep 1 8 128 512 \
		--save notebooks/results/bench_moe_compiled.json
	$(BIN)/python -m helpers.bench mla --threads 2 --save notebooks/results/bench_mla.json
	$(BIN)/python -m helpers.bench dsa --threads 2 --repeats 15 --save notebooks/results/bench_dsa.json
	$(BIN)/python -m helpers.bench model --threads 2 --save notebooks/results/bench_model.json
	$(BIN)/python -m helpers.bench v4 --threads 2 --out notebooks/results/v4_bench_decode.json
	$(BIN)/python -m helpers.teaching.readme README.md

clean:
	rm -rf $(VENV) exercises build *.egg-info
