# Two commands on a fresh machine:  make run   (install + the main job)   make test   (install + tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The shared offline copy of CIFAR-10 when it is there, else ./data (downloaded by torchvision)
export CIFAR10_DIR ?= $(if $(wildcard ../shared/datasets/cifar10),../shared/datasets/cifar10,./data)

.PHONY: install run test test-all notebook training

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

# The main job on the default model (no --checkpoint: checkpoints.DEFAULT_CHECKPOINT, fast10g_h256_2x80_kdw.pt):
# torch accuracy, then 3 test images through real FHE beside their simulated and torch predictions
run: install
	$(PY) infer_torch.py
	$(PY) fhe_inference.py --n-images 3 --out-dir runs/fhe_default_make

# Two tiers, each with its own pytest summary line; the first failure stops make with a
# non-zero status (tests/conftest.py keeps pytest's status after Concrete has run).
#   fast    generated tiny data and tiny circuits (about 10 minutes here, 2 cores)
#   dataset the shipped checkpoints and the notebook on ../shared/datasets/cifar10 (skipped without it)
# `make test-all` adds the tests marked slow (the shipped model under real FHE).
test: install
	@echo "== tier: fast (tiny data and circuits)"
	$(PY) -m pytest -q -m "not slow and not dataset" tests
	@echo "== tier: dataset (shipped checkpoints, notebook)"
	$(PY) -m pytest -q -m "dataset and not slow" tests

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" tests

notebook: install
	$(PY) tools/run_notebook.py --write --mode $${NOTEBOOK_MODE:-quick}

# The queue of long trainings for the frontier (issue 12, README "In training"), in order, each
# resumed from its <out>.state.pt where one exists: run it in the background, and run it again
# after any interruption (a lost epoch is the only loss; a finished step is not run again):
#   nohup make training > runs/training.out 2>&1 &
# The teacher resnet_w (40 epochs), evaluated on the test split and copied to checkpoints/ when
# done; then each student, distilled from it from scratch with the schedule of the model it
# follows, 30 epochs (fast10g_kd's) or fast_kd's 40 for the others (--bf16: about 1.5 times
# faster on the Xeon, the same validation top-1, RESULTS.md; train.py drops it, with a line in
# the log, on a CPU without bfloat16 kernels, where it is 15 times slower): fast10g4 (the candidate for the fast
# target), fast (fast_kd's layout and schedule: what the stronger teacher gives the default
# model), accurate60 (the 4,106-lookup candidate for the 60 s target), fast_a4 (fast with 4-bit
# activations: fast_kdw's run with only the bit widths changed), accurate (16 x 16 after the clear
# layer where every student so far had 8 x 8), fast_e80 (fast_kdw's run with twice the epochs:
# whether the 40-epoch schedule holds the students near 0.81; it was the schedule: 80 epochs reached
# 0.8176 in torch; shipped as the default, searched again at fast_kd's tolerance, its JSON now the
# shipped copy's benchmark), fast10g_e80 (fast10g_kd's layout with fast_e80's 80 epochs: what the
# schedule gives the candidate for the fast target; 0.7932 in torch, shipped as the fast end of the
# frontier, searched again at tolerance 0.01, its JSON now the shipped copy's benchmark),
# fast10g_2x80 (fast10g_e80's weights trained through a second 80-epoch cycle of the same
# schedule, its learning rate warm again: half the cost of 160 epochs from scratch, to learn
# whether more epochs still move the fast target's candidate; it needs fast10g_e80's checkpoint,
# which the order of the queue gives), fast10g_h256 (80 epochs from scratch of fast10g with a
# hidden linear of 256: 698 lookups where fast10g has 570, the 128 added where lookups cost least;
# 11 % slower than fast10g untrained, results/benchmark_fast10g_h256_untrained.json, so about 9 s at
# fast10g_e80's setting), fast10g_h256_2x80 (fast10g_h256's weights through a second 80-epoch
# cycle, as fast10g_2x80 took fast10g_e80's: that cycle gave fast10g 0.7 points in torch, and the
# fast target wants about 0.812 in torch at this cost), fast10g_c128 (80 epochs from scratch of
# fast10g behind a clear conv of 128 channels, its encrypted conv in one group: the same 570
# lookups and multiply-adds from half the encrypted inputs, whose reading and expansion took 3.3 s
# of fast10g_2x80_kdw's 10.7 on the AVX2 AMD EPYC; its untrained screen compiled to larger
# parameters because its untrained hidden linear's lookups read 7 bits, a calibration-range effect
# the trained models do not show; with those lookups fitted to 6 bits, the same parameters as
# fast10g and 11.7 s against 13.4 untrained, RESULTS.md "Fewer encrypted inputs"). fast10g_c128
# runs before fast10g_h256_2x80's remaining epochs (moved on 6 December, after epoch 14 of 80: on the
# AVX2-only AMD EPYC the 698-lookup h256 cannot reach 10 s at the fast end's crypto parameters, while
# the fitted screen puts a trained c128 near 9 s), then fast10g_c128_2x80 (fast10g_c128's weights
# through a second 80-epoch cycle, as fast10g_2x80 took fast10g_e80's: fitted, fast10g_c128 took
# 8.6 s at epoch 17 where fast10g_2x80 takes 10.7, so the cycle that gave fast10g 0.7 points can be
# tried at the fast target's cost); fast10g_h256_2x80 resumes from its state after them. Then
# fast10g_c128_h256 (80 epochs from scratch of fast10g_c128 with fast10g_h256's hidden linear: 698
# lookups from half the encrypted inputs, the accuracy the hidden linear adds at the cost c128 saves;
# step 13's fast10g_c128_2x80 ended 0.3 points short of the fast target at 6.9 s on the AVX-512 AMD
# EPYC) and fast10g_c128_h256_2x80 (its second 80-epoch cycle), both capped and fitted as step 13.
# Then fast_e80_2x80 (step 16, queued on 7 December: the 2,314-lookup fast_e80's weights through a
# second 80-epoch cycle, which gave the 570- and 698-lookup students 0.3 to 0.7 points in torch;
# the accurate target's side of the frontier, searched at the shipped fast_e80_kdw's tolerance
# 0.01, uncapped: its 60 s leaves room). A finished student is evaluated in torch, its p_error
# searched and written into it as fast10g_kd's was, and benchmarked (full test split, 3
# simulations, 5 images in real FHE) from checkpoints/in_training/; the benchmark's JSON marks
# the step done. Shipping it (a copy to checkpoints/, benchmark.py's default rows, the README) is
# decided by hand on those results.
TRAINING ?= checkpoints/in_training
STUDENTS := fast10g4 fast accurate60 fast_a4 accurate fast_e80 fast10g_e80 fast10g_2x80 fast10g_h256 fast10g_c128 fast10g_c128_2x80 fast10g_h256_2x80 fast10g_c128_h256 fast10g_c128_h256_2x80 fast_e80_2x80
# A student named apart from its layout (models.py) trains the layout given here.
MODEL_fast_e80 := fast
MODEL_fast10g_e80 := fast10g
MODEL_fast10g_2x80 := fast10g
MODEL_fast10g_h256_2x80 := fast10g_h256
MODEL_fast10g_c128_2x80 := fast10g_c128
MODEL_fast10g_c128_h256_2x80 := fast10g_c128_h256
MODEL_fast_e80_2x80 := fast
EPOCHS_fast := 40
EPOCHS_accurate60 := 40
EPOCHS_fast_a4 := 40
EPOCHS_accurate := 40
EPOCHS_fast_e80 := 80
EPOCHS_fast10g_e80 := 80
EPOCHS_fast10g_2x80 := 80
EPOCHS_fast10g_h256 := 80
EPOCHS_fast10g_h256_2x80 := 80
EPOCHS_fast10g_c128 := 80
EPOCHS_fast10g_c128_2x80 := 80
EPOCHS_fast10g_c128_h256 := 80
EPOCHS_fast10g_c128_h256_2x80 := 80
EPOCHS_fast_e80_2x80 := 80
# A student that starts from another's weights (--init), not from random ones.
INIT_fast10g_2x80 := $(TRAINING)/fast10g_e80_kdw.pt
INIT_fast10g_h256_2x80 := $(TRAINING)/fast10g_h256_kdw.pt
INIT_fast10g_c128_2x80 := $(TRAINING)/fast10g_c128_kdw.pt
INIT_fast10g_c128_h256_2x80 := $(TRAINING)/fast10g_c128_h256_kdw.pt
INIT_fast_e80_2x80 := $(TRAINING)/fast_e80_kdw.pt
# The search's tolerance (top-1 drop from the clear quantized model on 1,000 training images):
# fast10g_kd's 0.005, except accurate60, whose 6-bit rounding alone lost 0.0065 at p_error 1e-6
# (results/accurate60/p_error_search_tolerance_0.005.log), so no p_error met 0.005; and accurate,
# whose 4,746 lookups are more still; and fast10g_2x80 and fast10g_h256, because fast10g_e80 (the
# first's starting weights, the second's layout but for its hidden linear) was pushed to polynomial
# size 4096 at 0.005 (21.8 s, past the fast target's 10) and was shipped after a second search at
# 0.01 by hand (RESULTS.md).
TOLERANCE_accurate60 := 0.01
TOLERANCE_accurate := 0.01
TOLERANCE_fast10g_2x80 := 0.01
TOLERANCE_fast10g_h256 := 0.01
TOLERANCE_fast10g_h256_2x80 := 0.01
TOLERANCE_fast10g_c128 := 0.01
TOLERANCE_fast10g_c128_2x80 := 0.01
TOLERANCE_fast10g_c128_h256 := 0.01
TOLERANCE_fast10g_c128_h256_2x80 := 0.01
TOLERANCE_fast_e80_2x80 := 0.01
# Then walk p_error down while Concrete's complexity stays within 10 % (p_error_search.py
# --cost-slack): fast10g_2x80's searched 0.146 went down to 0.0616 for 9 % more complexity, at the
# same crypto parameters but the LWE dimension, and lost nothing in validation where 0.146 lost 0.8
# points (results/fast10g_2x80_kdw/p_error_search_cost_slack_0.1.json).
COST_SLACK_fast10g_h256 := 0.1
COST_SLACK_fast10g_h256_2x80 := 0.1
COST_SLACK_fast10g_c128 := 0.1
# Step 13 walks down as far as the cap below allows, to be judged at the fast end's cost: step 12's
# 10 % slack kept 0.220 (polynomial size 1024, k 2: 12.5 s per image, simulated 0.7854); capped, 0.0696
# (2048, 1) took 13.7 s back to back, for 0.7876, and 13.1 s where fast10g_2x80_kdw took 15.9 right
# after at the same simulated top-1 (RESULTS.md, the training queue's step 12; AVX2-only AMD EPYC).
COST_SLACK_fast10g_c128_2x80 := 1
COST_SLACK_fast10g_c128_h256 := 1
COST_SLACK_fast10g_c128_h256_2x80 := 1
# A cap on Concrete's complexity (p_error_search.py --max-complexity): the p_error found is raised
# until the circuit costs no more than this. fast10g_h256's search stayed at level 2 (16.0 s per
# image where the shipped fast10g_2x80_kdw took 10.8 s, one AMD EPYC, 6 December); the cap is
# fast10g_2x80_kdw's complexity at its deployed p_error (6.05e10, the walk in
# results/fast10g_2x80_kdw/p_error_search_cost_slack_0.1.json), so that step 11 is deployed at
# the fast end's cost and judged by its top-1 there (fast10g_h256 at that cap: p_error 0.211,
# polynomial size 1024, 11.7 s against fast10g_2x80_kdw's 10.8 on that machine: the complexity
# ranks parameter sets only roughly; results/fast10g_h256_kdw/).
MAX_COMPLEXITY_fast10g_h256_2x80 := 6.06e10
MAX_COMPLEXITY_fast10g_c128_2x80 := 6.06e10
MAX_COMPLEXITY_fast10g_c128_h256 := 6.06e10
MAX_COMPLEXITY_fast10g_c128_h256_2x80 := 6.06e10
# Lookups fitted to the 6 rounding bits (p_error_search.py --fit-lookups, stored with the p_error
# and so followed by the benchmark): fast10g_c128's untrained screen compiled its hidden linear's
# lookups to read 7 bits, doubling their polynomial size, and read 6 fitted (RESULTS.md, "The
# screen again"); trained to epoch 17, its output layer's did (8.6 s fitted, 10.9 unfitted: "The
# trained fast10g_c128 at epoch 17"); where every lookup already reads 6, fitting changes nothing.
FIT_LOOKUPS_fast10g_c128 := 1
FIT_LOOKUPS_fast10g_c128_2x80 := 1
FIT_LOOKUPS_fast10g_c128_h256 := 1
FIT_LOOKUPS_fast10g_c128_h256_2x80 := 1
resume = $(if $(wildcard $(TRAINING)/$(1).state.pt),--resume)

training: $(STUDENTS:%=results/benchmark_%_kdw.json)

results/benchmark_%_kdw.json: | checkpoints/resnet_w.pt install  # order-only: its JSON alone marks a step done, whatever the mtimes
	$(PY) train.py --model $(or $(MODEL_$*),$*) --epochs $(or $(EPOCHS_$*),30) --label-smoothing 0.1 --teacher checkpoints/resnet_w.pt \
		--bf16 --workers 0 --threads 2 $(if $(INIT_$*),--init $(INIT_$*)) --out $(TRAINING)/$*_kdw.pt $(call resume,$*_kdw)
	$(PY) infer_torch.py --checkpoint $(TRAINING)/$*_kdw.pt --json results/$*_kdw_torch.json
	$(PY) p_error_search.py --checkpoint $(TRAINING)/$*_kdw.pt --rounding-bits 6 --tolerance $(or $(TOLERANCE_$*),0.005) --n-images 1000 \
		--max-iter 6 --n-sim 2 --n-validation 20 --workers 2 $(if $(COST_SLACK_$*),--cost-slack $(COST_SLACK_$*)) \
		$(if $(MAX_COMPLEXITY_$*),--max-complexity $(MAX_COMPLEXITY_$*)) $(if $(FIT_LOOKUPS_$*),--fit-lookups) \
		--write --json results/p_error_search_$*_kdw.json
	$(PY) benchmark.py --configs $*_kdw --checkpoint-dir $(TRAINING) --n-images 10000 --repeats 3 --n-fhe 5 \
		--json $@ --plot runs/frontier_$*_kdw.png

checkpoints/resnet_w.pt: | install
	$(PY) train.py --model resnet_w --epochs 40 --lr 5e-3 --weight-decay 0.05 --label-smoothing 0.1 \
		--bf16 --threads 2 --workers 0 --out $(TRAINING)/resnet_w.pt $(call resume,resnet_w)
	$(PY) infer_torch.py --checkpoint $(TRAINING)/resnet_w.pt --json results/resnet_w_torch.json
	cp $(TRAINING)/resnet_w.pt $@
