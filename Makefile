# fastiaa. Every target creates the virtual environment it needs (.venv) on first use.
#   make train                          kanji demo (real glyph images), efficientnet_lite0, MS + IAA
#   make train DATASET=stanford DATA=/path/to/datasets WEIGHTS=/path/to/weights [NPROC=8] [ARGS="..."]
#   make sweep SWEEP=sweeps/kanji_iaa.yaml [ARGS="..."]   the runs of a sweep file, then their table
#   make reproduce DATASET=cub200 DATA=... WEIGHTS=... [SEEDS=3] [NPROC=8]   the paper's command over seeds
#   make test | make bench | make data | make clean
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATASET ?= kanji
DATA    ?= $(if $(filter kanji,$(DATASET)),data/kanji,MyDataset)
WEIGHTS ?=
NPROC   ?= 1
ARGS    ?=
SWEEP   ?=
SEEDS   ?= 3
KANJI   := data/kanji/Ebay_test.txt
LAUNCH  := $(if $(filter 1,$(NPROC)),$(BIN)/fastiaa,$(BIN)/torchrun --nproc-per-node $(NPROC) -m fastiaa)

.PHONY: all venv train sweep reproduce test bench data clean
all: venv

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

data: $(KANJI)
$(KANJI): | $(STAMP)
	$(BIN)/fastiaa data kanji --out data/kanji

RUN_ARGS   = --preset $(DATASET) --data $(DATA) $(if $(WEIGHTS),--weight_path $(WEIGHTS)) $(ARGS)
TRAIN_ARGS = train $(RUN_ARGS)
train: $(STAMP) $(if $(filter kanji,$(DATASET)),$(KANJI))
	$(LAUNCH) $(TRAIN_ARGS)

# Every run of a sweep file (fastiaa sweep; ARGS: train flags for every run), ending with its table
# (report.md). A sweep file whose name says kanji gets the demo data first.
sweep: $(STAMP) $(if $(findstring kanji,$(SWEEP)),$(KANJI))
	$(if $(SWEEP),,$(error make sweep needs SWEEP=path/to/sweep.yaml, e.g. SWEEP=sweeps/kanji_iaa.yaml))
	$(BIN)/fastiaa sweep $(SWEEP) $(ARGS)

# The authors' published settings for one paper dataset (docs/method.md §7), the whole 100-epoch run, over
# SEEDS seeds (NPROC GPUs per run); it ends with the mean +- std of Recall@K / MAP@R / R-Precision next to
# the paper's (runs/reproduce_DATASET/report.md).
reproduce: $(STAMP)
	$(if $(filter $(DATASET),cub200 cars196 stanford inshop),,$(error make reproduce needs DATASET=cub200, cars196, stanford or inshop (got '$(DATASET)'); the kanji demo is `make train`))
	$(BIN)/fastiaa sweep --dir runs/reproduce_$(DATASET) --seeds $(SEEDS) --gpus-per-run $(NPROC) sweeps/reproduce.yaml $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(KANJI)
	$(BIN)/python -m bench.bench_eval
	$(BIN)/python -m bench.bench_estimator
	$(BIN)/python -m bench.bench_synthesis
	$(BIN)/python -m bench.bench_kernels
	$(BIN)/python -m bench.bench_pipeline
	$(BIN)/python -m bench.bench_cache
	$(BIN)/python -m bench.bench_train
	$(BIN)/python -m bench.bench_ddp
	$(BIN)/python -m bench.bench_index
	$(BIN)/python -m bench.bench_embed

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
