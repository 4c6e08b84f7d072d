# ghibli_lab: `make help` lists the targets. Every target uses the project venv in .venv/,
# created (torch pinned first, so pip takes the CPU wheel here and the CUDA build on a GPU box)
# on first use.
PY := .venv/bin/python
VENV := .venv/.installed
ARGS ?=
RUN ?= outputs/latest

.DEFAULT_GOAL := help
.PHONY: help install demo multistyle-demo test train sweep eval report generate bench bench-tiny clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet torch==2.13.0
	.venv/bin/pip install --quiet -e '.[dev,slurm]'
	touch $@

install: $(VENV) ## create .venv and install the project (done by every target on first use)

demo: $(VENV) ## 2x2 rank x alpha sweep on tiny SDXL + generated data, its evaluation and report: offline, CPU, ~2-3 min
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.train -m experiment=demo lora.rank=4,8 lora.alpha=4,8 $(ARGS)
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.evaluate run_dir=outputs/latest eval.steps=4
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.report sweep_dir=outputs/latest
	@echo; echo "Results: outputs/latest -> $$(readlink outputs/latest)"; \
	  echo "  report/index.html: eval table, heatmaps, val-loss curves, base-vs-LoRA grids (open in a browser)"; \
	  echo "  eval_table.md: the runs and the base model, by held-out KID"; \
	  echo "  each run: lora/ (diffusers + kohya files), eval/metrics.json, samples/final.png, metrics.jsonl"

multistyle-demo: $(VENV) ## one LoRA per style of the generated set (tiny SD 1.5) and the style-separation matrix: offline, CPU, ~3 min
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.train -m experiment=multistyle_demo dataset.style=watercolor,comic $(ARGS)
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.evaluate run_dir=outputs/latest
	HF_HUB_OFFLINE=1 $(PY) -m ghibli_lab.report sweep_dir=outputs/latest
	@echo; echo "Results: outputs/latest -> $$(readlink outputs/latest)"; \
	  echo "  style_matrix.md: each style's adapter scored against both styles' held-out images (lowest = closest)"; \
	  echo "  report/index.html: the matrix drawn, with the sample grids and val-loss curves"

test: $(VENV) ## run the test suite (tiny models, offline; slow and GPU tests deselected)
	$(PY) -m pytest -q -m "not slow and not gpu"

train: $(VENV) ## one run: make train ARGS="model=sdxl dataset=ghibli100 lora.rank=16"
	$(PY) -m ghibli_lab.train $(ARGS)

sweep: $(VENV) ## the 12-run rank x alpha grid of the seed study (SDXL, Ghibli-100; needs a GPU)
	$(PY) -m ghibli_lab.train -m experiment=ghibli100_sdxl lora.rank=4,8,16 lora.alpha=4,8,16,32 $(ARGS)

eval: $(VENV) ## held-out KID/FID/CLIP/val-loss of outputs/latest (RUN=<run or sweep dir>, ARGS="eval.steps=50")
	$(PY) -m ghibli_lab.evaluate run_dir=$(RUN) $(ARGS)

report: $(VENV) ## HTML report of a sweep: eval table, heatmaps, val-loss curves, grids (RUN=<sweep dir>)
	$(PY) -m ghibli_lab.report sweep_dir=$(RUN) $(ARGS)

generate: $(VENV) ## base-vs-LoRA grids: make generate ARGS='prompt="a castle" loras=[outputs/latest/0_lora.alpha-4_lora.rank-4]'
	$(PY) -m ghibli_lab.generate $(ARGS)

bench: $(VENV) ## LoRA step benchmark on full-size SDXL + SD 1.5 (GPU): images/s, peak memory, MFU
	$(PY) -m ghibli_lab.bench $(ARGS)

bench-tiny: $(VENV) ## the same benchmark code on the tiny models (CPU, ~20 s); prints its bench.json path
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m ghibli_lab.bench size=tiny 'batch_sizes=[1,2]' warmup=1 steps=3 $(ARGS)

clean: ## remove outputs/ and caches (keeps .venv)
	rm -rf outputs .cache .pytest_cache
