# Thin targets: each one line that calls the kit's command line (`hcd-kit …`, i.e. `python -m kit …`) with the
# variables passed on. A variable given on the command line that its target does not take (FOLDS=2, fold=2, EPOCH=3)
# is refused in one line with the nearest name, before any work; the environment's variables pass (VARS_<target>).
# Variables: CONFIG, FOLD, DATA_DIR, OUT, EPOCHS, ARGS='key=value …', FORCE=1, ALLOW_MISSING_FOLDS=1,
#            FILE, MESSAGE, DRY_RUN=1, BUNDLE, EXPS='a b' (predict: blend; report: side by side),
#            BLEND=mean|rank, EXP (report: configs/<EXP>.yaml), TARGET_SENSITIVITY, SALIENCY_IMAGES, DEVICE (bench),
#            HARD=1 (demo-data), CONFIGS, SEEDS, FOLDS (results), PARALLEL=N|auto (train-all: folds at once),
#            NPROC=N (train: one fold on N processes, DDP), NNODES=M RDZV=host:port RDZV_ID (train: on M machines),
#            ACCELERATOR, SUBMIT=1 (kaggle-run), MINUTES, QUICK=1 (gpu-check), PY=python3 (gpu-check on the
#            machine's own torch, without .venv), PYTHON (the Python that builds the venvs; every target),
#            MINUTES SPACE TUNE_FOLDS=0,1 PARALLEL=N STORAGE TRIALS (tune), TUNED SEEDS (prove).

.DEFAULT_GOAL := help

CONFIG ?= configs/baseline_bn.yaml
FOLD ?= 0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

# The variables each target takes (the header says what each does). One given on the command line (origin
# `command line`) that none of the goals takes is refused here, before the venv is built or anything runs; make's own
# (MAKEFLAGS …) and the environment's pass. A goal without a list (a file) takes any target's.
EXPERIMENT_VARS := CONFIG DATA_DIR OUT EPOCHS ARGS
DDP_VARS := NPROC NNODES RDZV RDZV_ID
VARS_help :=
VARS_venv :=
VARS_clean-venv :=
VARS_lint :=
VARS_test :=
VARS_test-all :=
VARS_test-quick :=
VARS_test-oldest :=
VARS_demo := OUT ARGS FORCE
VARS_demo-data := HARD DATA_DIR FORCE
VARS_data := DATA_DIR
VARS_cache := $(EXPERIMENT_VARS)
VARS_config := $(EXPERIMENT_VARS)
VARS_train := $(EXPERIMENT_VARS) FOLD FORCE $(DDP_VARS)
VARS_train-all := $(EXPERIMENT_VARS) FORCE PARALLEL $(DDP_VARS)
VARS_predict := $(EXPERIMENT_VARS) ALLOW_MISSING_FOLDS EXPS BLEND
VARS_submit := $(EXPERIMENT_VARS) FILE MESSAGE DRY_RUN FORCE
VARS_submissions :=
VARS_kaggle-run := $(EXPERIMENT_VARS) ACCELERATOR SUBMIT FORCE
VARS_kaggle-bundle := BUNDLE
VARS_bench := OUT DEVICE
VARS_gpu-check := OUT MINUTES QUICK DEVICE CONFIGS PY
VARS_results := CONFIGS SEEDS FOLDS ARGS
VARS_report := $(EXPERIMENT_VARS) EXP EXPS TARGET_SENSITIVITY SALIENCY_IMAGES
VARS_tune := $(EXPERIMENT_VARS) MINUTES SPACE TUNE_FOLDS PARALLEL STORAGE TRIALS
VARS_prove := $(EXPERIMENT_VARS) TUNED SEEDS
VARS_every := PYTHON
MAKE_OWN_VARS := MAKEFLAGS GNUMAKEFLAGS MFLAGS MAKEFILES MAKEOVERRIDES MAKELEVEL MAKE SHELL .SHELLFLAGS
TARGETS := $(patsubst VARS_%,%,$(filter-out VARS_every,$(filter VARS_%,$(.VARIABLES))))

GOALS := $(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))
goal_vars = $(if $(filter undefined,$(origin VARS_$(1))),$(foreach t,$(TARGETS),$(VARS_$(t))),$(VARS_$(1)))
KNOWN_VARS := $(sort $(foreach g,$(GOALS),$(call goal_vars,$(g))) $(VARS_every))
GIVEN_VARS := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
UNKNOWN_VARS := $(filter-out $(KNOWN_VARS) $(MAKE_OWN_VARS),$(GIVEN_VARS))
# "did you mean": the goals' nearest variable (any case), else the targets that do take it (stdlib only)
DID_YOU_MEAN = import difflib, sys; \
  goals, bad, known = "`make " + sys.argv[1] + "`", sys.argv[2].split(), sys.argv[3].split(); \
  elsewhere = dict(pair.split("=") for pair in sys.argv[4].split()); \
  upper = {name.upper(): name for name in known}; \
  near = lambda name: difflib.get_close_matches(name.upper(), list(upper), 1, 0.6); \
  takers = " and ".join; \
  hint = lambda name: "did you mean " + upper[near(name)[0]] + "?" if near(name) else "it is a variable of " + \
    takers("`make " + t + "`" for t in elsewhere[name].split(",")) if elsewhere[name] else ""; \
  said = [name + (" (" + hint(name) + ")" if hint(name) else "") for name in bad]; \
  head = bad[0] + " is not a variable of " + goals + "; " + hint(bad[0]) if len(bad) == 1 and hint(bad[0]) else \
    ", ".join(said) + (" is not a variable" if len(bad) == 1 else " are not variables") + " of " + goals; \
  print(head + " (" + goals + " takes " + (" ".join(known) or "none") + ")")
, := ,
ifneq ($(UNKNOWN_VARS),)
TAKERS := $(foreach v,$(UNKNOWN_VARS),$(v)=$(subst $() ,$(,),$(strip $(foreach t,$(TARGETS),\
  $(if $(filter $(v),$(VARS_$(t))),$(t))))))
$(error $(or $(shell $(PYTHON) -c '$(DID_YOU_MEAN)' "$(GOALS)" "$(UNKNOWN_VARS)" "$(KNOWN_VARS)" \
  "$(TAKERS)" 2>/dev/null),`make $(GOALS)` does not take $(UNKNOWN_VARS) (it takes $(KNOWN_VARS))))
endif

# Counts given on the command line are whole numbers (EPOCHS=abc is named here, not as the config's `epochs`)
WHOLE_NUMBER_VARS := EPOCHS FOLD NPROC NNODES SEEDS FOLDS
non_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst \
  8,,$(subst 9,,$(1)))))))))))
NOT_WHOLE := $(firstword $(foreach v,$(filter $(WHOLE_NUMBER_VARS),$(GIVEN_VARS)),$(if $(or \
  $(call non_digits,$(subst $() ,x,$($(v)))),$(if $($(v)),,$(filter FOLD,$(v)))),$(v))))
ifneq ($(NOT_WHOLE),)
$(error $(NOT_WHOLE)=$($(NOT_WHOLE)) must be a whole number, e.g. $(NOT_WHOLE)=$(if $(filter FOLD,$(NOT_WHOLE)),0,3))
endif

# Recipes are one line with the optional flags in $(strip …): `make -n` shows the command as it runs.
EXPERIMENT = --config $(CONFIG) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)) \
             $(if $(EPOCHS),epochs=$(EPOCHS)) $(ARGS)
FORCE_FLAG = $(if $(filter 1 true yes,$(FORCE)),--force)

.PHONY: tune prove help lint demo test test-all test-quick test-oldest demo-data data cache config train train-all predict \
        submit submissions kaggle-bundle kaggle-run report bench gpu-check results venv clean-venv

# The tests run on every core (pytest-xdist), a test file per worker (a file's fixtures are built once); each
# worker's torch gets its share of the cores (tests/conftest.py).
XDIST := -n auto --dist loadfile
# On a CPU, glibc's malloc hands each training step's freed tensors back to the kernel and faults them in again at the
# next: a quarter of a CPU run's time went to the kernel (measured, a demo fold on one thread, two runs each way:
# 14.5–15.2 s → 11.7–11.9 s, the process's kernel time 5.0–5.6 s → 2.1–2.6 s with these). The tests and `make demo`,
# and every process they start, keep freed memory instead.
CPU_MALLOC := MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432

# The oldest versions requirements-kaggle.txt admits (requirements-oldest.txt), over .venv's torch: a light venv whose
# site-packages also lists .venv's, so its own older packages come first. `make test` runs the version-sensitive
# tests in it too; `make test-oldest` only those.
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.requirements-installed
OLDEST_TESTS := tests/test_recipes.py tests/test_recipe.py tests/test_augment.py tests/test_inference.py \
                tests/test_models.py tests/test_data.py tests/test_config.py tests/test_engine.py
# The 224 px recipes (compete_*), SWA (torch's own, the same in both venvs) and the slow tests (the engine's
# whole-fold resume and learning runs, on .venv's torch either way) run in the main pass only: the oldest versions run
# every other test of these files, the 224 px recipes' timm families among them (it keeps `make test` within 15
# minutes on 2 cores).
OLDEST_PYTEST := $(CPU_MALLOC) $(OLDEST_PY) -m pytest -q -p no:cacheprovider $(XDIST) $(OLDEST_TESTS) -k "not compete_ and not swa" \
                 -m "not slow"
PURELIB := import sysconfig; print(sysconfig.get_path('purelib'))

# The virtual environment is (re)built whenever requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# `make` alone: every target with its one line (the `## ` after each rule), then the variables (the header above).
help:
	@echo "make <target> [VARIABLE=value …]   (first run: make demo, make test)"
	@echo
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/\1\t\2/' | \
		awk -F'\t' '{ printf "  %-15s %s\n", $$1, $$2 }'
	@echo
	@sed -n '/^# Variables:/,/^$$/p' $(MAKEFILE_LIST) | sed -E 's/^# ?/  /'

venv: $(STAMP)    ## build .venv from requirements.txt (rebuilt when it changes)

demo: $(STAMP)    ## generate demo data, train every fold of configs/demo.yaml on CPU, predict with TTA
	$(PY) -m kit demo-data --out data/demo
	$(strip $(CPU_MALLOC) $(PY) -m kit train-all --config configs/demo.yaml $(FORCE_FLAG) $(if $(OUT),--out $(OUT)) $(ARGS))
	$(strip $(CPU_MALLOC) $(PY) -m kit predict --config configs/demo.yaml $(if $(OUT),--out $(OUT)) $(ARGS))
	@echo "demo done: the submission above answers data/demo's sample_submission.csv. Next:"
	@echo "  make report CONFIG=configs/demo.yaml     what the folds learned: AUC, thresholds, mistakes, saliency"
	@echo "  make demo-data HARD=1                    the hard generated set (slides, stain, label noise): tells recipes apart"
	@echo "  make data && make train-all              the competition's data (Kaggle credentials), the default recipe"

# `make test` (what CI runs, within 15 minutes on 2 cores) leaves out the few `evidence` tests: learning claims that
# take minutes of training each, which docs/RESULTS.md measures at scale; `make test-all` runs them too.
test: lint $(OLDEST_STAMP)    ## lint, every test but the learning-evidence runs, then the oldest versions' pass
	$(CPU_MALLOC) $(PY) -m pytest -q $(XDIST) -m "not evidence" tests
	$(OLDEST_PYTEST)

test-all: lint $(OLDEST_STAMP)    ## make test with the 3 learning-evidence runs (188 s of test time, measured on 2 cores)
	$(CPU_MALLOC) $(PY) -m pytest -q $(XDIST) tests
	$(OLDEST_PYTEST)

lint: $(STAMP)    ## ruff check kit tests (pyflakes, bugbear, import order, pyupgrade)
	$(PY) -m ruff check kit tests

# The quick loop while working: every test but the few marked slow (over ~20 s each), in the main .venv only.
test-quick: $(STAMP)    ## every test but those marked slow, in .venv only (the loop while working)
	$(CPU_MALLOC) $(PY) -m pytest -q $(XDIST) -m "not slow" tests

$(OLDEST_STAMP): requirements-oldest.txt $(STAMP)
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(PY) -c "$(PURELIB)" > "$$($(OLDEST_PY) -c "$(PURELIB)")/kit-shared.pth"
	$(OLDEST_PY) -m pip install --quiet -r requirements-oldest.txt
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)    ## the version-sensitive tests in .venv-oldest only
	$(OLDEST_PYTEST)

# HARD=1: the hard generated set (data/hard): slides, stain, hard negatives, noisy labels; tells recipes apart
demo-data: $(STAMP)    ## generated data in the Kaggle layout (HARD=1: the hard set, data/hard)
	$(strip $(PY) -m kit demo-data $(if $(filter 1 true yes,$(HARD)),--difficulty hard) \
	    $(if $(DATA_DIR),--out $(DATA_DIR)) $(FORCE_FLAG))

cache: $(STAMP)    ## decode every TIFF once into the uint8 cache
	$(strip $(PY) -m kit cache $(EXPERIMENT))

config: $(STAMP)    ## the effective config as YAML: CONFIG= with DATA_DIR=, OUT=, EPOCHS=, ARGS= applied
	$(strip $(PY) -m kit config show $(EXPERIMENT))

# NPROC=N: one fold on N processes (DDP; a GPU each, or CPU processes over gloo) through torchrun (kit/launch.py);
# NNODES=M RDZV=host:port: the same on M machines (run the same command on each; kit/distributed.py)
TORCHRUN = $(PY) -m kit.launch --nproc_per_node $(NPROC) \
           $(if $(NNODES),--nnodes $(NNODES) --rdzv-backend c10d --rdzv-id $(or $(RDZV_ID),kit) \
             --rdzv-endpoint $(or $(RDZV),$(error NNODES=$(NNODES) needs RDZV=host:port, the first machine's address)))
train: $(STAMP)    ## train (or resume) one fold: FOLD=, NPROC= (DDP), FORCE=1
	$(strip $(if $(NPROC),$(TORCHRUN),$(PY)) -m kit train --fold $(FOLD) $(FORCE_FLAG) $(EXPERIMENT))

train-all: $(STAMP)    ## every fold, then the CV AUC: PARALLEL=N|auto (folds at once)
	$(strip $(if $(NPROC),$(TORCHRUN),$(PY)) -m kit train-all $(FORCE_FLAG) $(if $(PARALLEL),--parallel $(PARALLEL)) \
	    $(EXPERIMENT))

predict: $(STAMP)    ## folds × TTA → submissions/<experiment>-<time>.csv (EXPS='a b': a blend)
	$(strip $(PY) -m kit predict $(if $(filter 1 true yes,$(ALLOW_MISSING_FOLDS)),--allow-missing-folds) \
	    $(if $(EXPS),--exps "$(EXPS)" $(if $(BLEND),--blend $(BLEND))) $(EXPERIMENT))

submit: $(STAMP)    ## validate FILE= and upload it through the Kaggle API (DRY_RUN=1: validate only)
	$(strip $(PY) -m kit submit --file "$(FILE)" $(if $(MESSAGE),--message "$(MESSAGE)") \
	    $(if $(filter 1 true yes,$(DRY_RUN)),--dry-run) $(FORCE_FLAG) $(EXPERIMENT))

data: $(STAMP)    ## download, unzip and verify the competition data (Kaggle API)
	$(PY) -m kit data --data-dir $(or $(DATA_DIR),data)

submissions: $(STAMP)    ## list your recent submissions and their scores
	$(PY) -m kit submissions

# ACCELERATOR=NvidiaTeslaT4 (default) | NvidiaL4 …; SUBMIT=1 submits the CSV; FORCE=1 pushes a new kernel (kit/kaggle_run.py)
kaggle-run: $(STAMP)    ## train (and SUBMIT=1: submit) on Kaggle's GPUs from this machine
	$(strip $(PY) -m kit kaggle-run $(EXPERIMENT) $(if $(ACCELERATOR),--accelerator $(ACCELERATOR)) \
	    $(if $(filter 1 true yes,$(SUBMIT)),--submit) $(FORCE_FLAG))

# A time-boxed recipe search (kit/tune.py, docs/TUNE.md): MINUTES= of wall time, SPACE= (configs/spaces/), TUNE_FOLDS=0,1
# (the folds each trial trains), PARALLEL=N trial processes, STORAGE= a journal or RDB URL shared by several machines
tune: $(STAMP)    ## time-boxed recipe search → configs/<name>-tuned.yaml: MINUTES=, SPACE=, TUNE_FOLDS=0,1, PARALLEL=N
	$(strip $(PY) -m kit tune $(if $(MINUTES),--minutes $(MINUTES)) $(if $(SPACE),--space $(SPACE)) \
	    $(if $(TUNE_FOLDS),--folds $(TUNE_FOLDS)) $(if $(PARALLEL),--parallel $(PARALLEL)) \
	    $(if $(STORAGE),--storage $(STORAGE)) $(if $(TRIALS),--trials $(TRIALS)) $(EXPERIMENT))

prove: $(STAMP)    ## the tuned config against the starting one, every fold × SEEDS (≥ 3), a paired test: TUNED=
	$(strip $(PY) -m kit prove --tuned $(TUNED) $(if $(SEEDS),--seeds $(SEEDS)) $(EXPERIMENT))

kaggle-bundle: $(STAMP)    ## dist/hcd-kit.zip: the kit and its offline wheels, for a Kaggle dataset or a GPU box
	$(PY) -m kit bundle --out $(or $(BUNDLE),dist/hcd-kit.zip)

# images/s from files to the model (docs/PERFORMANCE.md); DEVICE=cpu|cuda, default auto
bench: $(STAMP)    ## images/s from files to the model on this machine (DEVICE=cpu|cuda)
	$(strip $(PY) -m kit bench $(if $(OUT),--out $(OUT)/bench) $(if $(DEVICE),--device $(DEVICE)))

# the GPU path proved on this card (kit/gpu_check.py) within MINUTES (default 7): one epoch per config under
# sync-debug "error" in each precision, compile, bench, TTA, rows appended to runs/gpu-check/gpu-check-<time>.jsonl
# as they finish; QUICK=1 small; DEVICE=cpu the same steps on the CPU; no GPU: one line, exit 2.
# PY=python3: the machine's own Python and torch, no .venv (an offline GPU box with the bundle's wheels, README).
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))    ## prove the GPU path on this card within MINUTES= (QUICK=1, DEVICE=cpu, PY=python3)
	$(strip $(PY) -m kit gpu-check $(if $(OUT),--out $(OUT)/gpu-check) $(if $(MINUTES),--minutes $(MINUTES)) \
	    $(if $(filter 1 true yes,$(QUICK)),--quick) $(if $(DEVICE),--device $(DEVICE)) \
	    $(if $(CONFIGS),--configs "$(CONFIGS)"))

# configs × seeds on the hard generated set → docs/RESULTS.md (hours on CPU; resumes). CONFIGS, SEEDS, FOLDS, ARGS.
results: $(STAMP)    ## CONFIGS= × SEEDS= on the hard set → docs/RESULTS.md
	$(strip $(PY) -m kit results $(if $(CONFIGS),--configs "$(CONFIGS)") $(if $(SEEDS),--seeds $(SEEDS)) \
	    $(if $(FOLDS),--folds $(FOLDS)) $(ARGS))

# EXP=name is short for CONFIG=configs/name.yaml; EXPS="a b" compares experiments instead.
report: CONFIG := $(or $(EXP),$(CONFIG))
report: $(STAMP)    ## OOF metrics, thresholds, figures, report.md (EXPS='a b': side by side)
	$(strip $(PY) -m kit report $(EXPERIMENT) $(if $(EXPS),--exps "$(EXPS)") \
	    $(if $(TARGET_SENSITIVITY),--target-sensitivity $(TARGET_SENSITIVITY)) \
	    $(if $(SALIENCY_IMAGES),--saliency-images $(SALIENCY_IMAGES)))

clean-venv:    ## delete .venv
	rm -rf $(VENV)
