PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv shapes demo test test-slow lint bench clean-venv

# The venv is (re)built whenever it is missing. PIP_CONSTRAINT reaches pip's isolated build
# environments too, which `-c` alone does not (see constraints.txt for why we need it).
$(BIN)/python: requirements.txt constraints.txt
	$(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install -q -r requirements.txt -c constraints.txt
	touch $(BIN)/python

venv: $(BIN)/python

# ---------------------------------------------------------------------------------------------
# The main job: the embedded synthetic shapes set, trained from scratch on the CPU, evaluated, and
# drawn. The configuration lives here so it can be read in one place; see README "make demo".
DEMO_DATA ?= datasets
DEMO_RUN ?= runs/demo
DEMO_OPTS ?= --dataset shapes --data_root $(DEMO_DATA) --train_sets train --val_sets val \
	--basenet resnet18 --pretrained none --fpn_channels 64 --num_head_layers 2 \
	--input_dim 256 --num_scales 1 --loss_type mbox --device cpu
DEMO_TRAIN_OPTS ?= --batch_size 16 --optimizer adamw --lr 0.002 --weight_decay 0.0001 --max_iter 1500 \
	--step_values 1100,1400 --warmup_iters 100 --save_step 500 --val_step 0 -j 2 --log_step 50

shapes: $(BIN)/python
	$(BIN)/python prep/shapes.py --data_root $(DEMO_DATA)

demo: $(BIN)/python
	$(BIN)/python prep/shapes.py --data_root $(DEMO_DATA)
	$(BIN)/python train.py $(DEMO_OPTS) $(DEMO_TRAIN_OPTS) --save_root runs --run_name demo --resume auto
	$(BIN)/python evaluate.py $(DEMO_OPTS) --checkpoint $$(ls $(DEMO_RUN)/model_*.pth | tail -n 1) --metric all
	$(BIN)/python demo.py --checkpoint $$(ls $(DEMO_RUN)/model_*.pth | tail -n 1) --images demo_data/samples \
		--save_path demo_data/outputs
	@$(BIN)/python -c "import glob, json; m = json.load(open(sorted(glob.glob('$(DEMO_RUN)/metrics_*.json'))[-1])); \
		print('shapes val VOC mAP@0.5 (area): %.4f   (07 11-point: %.4f)' % (m['voc_map_area'], m['voc_map_07_11pt']))"

# `make test` is the fast suite CI runs; slow end-to-end runs are marked `slow`.
# pytest exits 5 when it collects no test; that fails the target (and CI) with a message.
test: $(BIN)/python
	@$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status

test-slow: $(BIN)/python
	$(BIN)/python -m pytest -m slow

lint: $(BIN)/python
	$(BIN)/ruff check .

bench: $(BIN)/python
	$(BIN)/python bench/bench_components.py

clean-venv:
	rm -rf $(VENV)
