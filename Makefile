PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv shapes demo test test-slow lint bench gpu-suite clean-venv

# The venv is (re)built whenever it is missing. PIP_CONSTRAINT reaches pip's isolated build
# environments too, which `-c` alone does not (see constraints.txt for why we need it).
$(BIN)/python: requirements.txt constraints.txt
	$(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install -q -r requirements.txt -c constraints.txt
	touch $(BIN)/python

venv: $(BIN)/python

# ---------------------------------------------------------------------------------------------
# The main job: the embedded synthetic shapes set, anchors clustered for it, a ResNet-18 FPN-OHEM
# detector trained from scratch on the CPU, evaluated (VOC + COCO metrics) and drawn. The whole
# configuration is these variables; see README "make demo".
# bf16 autocast only where the CPU has native bf16 instructions: AMX tiles (Intel Sapphire Rapids and
# later; oneDNN's bf16 channels-last convolutions train about 2.5x faster than fp32 there) or AVX512-BF16
# (AMD Zen 4 and later; about 1.6x). Elsewhere bf16 would be emulated and slower, so training stays fp32
# (and takes about 2.5x longer than the 15-minute target).
DEMO_DATA ?= datasets
DEMO_RUN ?= runs/demo
DEMO_ANCHORS ?= anchors/shapes_256.json
DEMO_AMP ?= $(shell grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && echo --amp)
DEMO_OPTS ?= --dataset shapes --data_root $(DEMO_DATA) --train_sets train --val_sets val \
	--basenet resnet18 --pretrained none --fpn_channels 64 --num_head_layers 2 \
	--input_dim 256 --loss_type mbox --device cpu --channels_last
# --matcher atss: adaptive positives per box (README "Matching"); the fixed 0.5 IoU threshold leaves the
# boxes of at most 22 px with one forced positive each, and most of them undetected.
DEMO_TRAIN_OPTS ?= --anchor_type kmeans --anchor_file $(DEMO_ANCHORS) --matcher atss --augment flip $(DEMO_AMP) \
	--batch_size 16 --optimizer adamw --lr 0.002 --weight_decay 0.0001 --max_iter 800 \
	--step_values 605,720 --warmup_iters 50 --save_step 200 --no_val -j 1 --log_step 25
# Inference (evaluate.py and demo.py): horizontal-flip test-time augmentation, merged before NMS.
DEMO_INFER_OPTS ?= --tta flip
# Scores down to 0.01 count for AP (as in SSD's VOC evaluation); the demo drawings keep 0.5.
DEMO_EVAL_OPTS ?= --metric all --conf_thresh 0.01 $(DEMO_INFER_OPTS)

shapes: $(BIN)/python
	$(BIN)/python prep/shapes.py --data_root $(DEMO_DATA)

demo: $(BIN)/python
	@start=$$(date +%s); \
	$(BIN)/python prep/shapes.py --data_root $(DEMO_DATA) && \
	$(BIN)/python kmeans_for_anchors.py --dataset shapes --data_root $(DEMO_DATA) --input_dim 256 \
		--out $(DEMO_ANCHORS) && \
	$(BIN)/python train.py $(DEMO_OPTS) $(DEMO_TRAIN_OPTS) --save_root runs --run_name demo --resume auto && \
	ckpt=$$(ls $(DEMO_RUN)/model_*.pth | tail -n 1) && \
	$(BIN)/python evaluate.py $(DEMO_OPTS) --checkpoint $$ckpt $(DEMO_EVAL_OPTS) && \
	$(BIN)/python demo.py --checkpoint $$ckpt --images demo_data/samples --save_path demo_data/outputs \
		$(DEMO_INFER_OPTS) && \
	$(BIN)/python -c "import glob, json; m = json.load(open(sorted(glob.glob('$(DEMO_RUN)/metrics_*.json'))[-1])); \
		print('shapes val VOC mAP@0.5: %.4f (area under the curve), %.4f (VOC07 11-point), $(DEMO_INFER_OPTS)' \
		% (m['voc_map_area'], m['voc_map_07_11pt']))" && \
	echo "make demo took $$(( $$(date +%s) - start )) s (venv creation excluded)"

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

# The GPU path in one run of at most 8 minutes (bench/gpu_suite.py): ONE JSON of every figure. No venv
# needed: a GPU machine's own python3 (offline) runs it; GPU_SUITE_OPTS="--device cpu --tiny" on a CPU.
GPU_SUITE_OPTS ?=
gpu-suite:
	bash bench/gpu_suite.sh $(GPU_SUITE_OPTS)

clean-venv:
	rm -rf $(VENV)
