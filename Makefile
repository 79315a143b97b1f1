# The course's commands. Each one creates or updates the local virtual environment (.venv) first,
# so a fresh clone needs nothing but Python 3.10+ (and Node.js for the book).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
JOBS ?= 2
export COURSE_CACHE ?= $(CURDIR)/.cache/data
export PYTHONHASHSEED = 0
# PyTorch's OpenMP threads sleep instead of spinning while they wait: on a busy laptop (or a CI
# machine running two test processes) spinning threads slow training down up to tenfold.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help setup test test-fast test-unit test-notebooks book lab labs notebooks clean

help:
	@echo "make book       execute the lectures and build the HTML book (_build/html; OFFLINE=1, NO_EXECUTE=1)"
	@echo "make test       run every test: the fast tier first, then parity and training, notebooks, browser clients"
	@echo "make test-fast  the fast tier only (pure functions, shapes, errors; under a minute)"
	@echo "make lab        open JupyterLab on the course"
	@echo "make labs       regenerate labs/ from solutions/ (FORCE=1 to replace edited labs, with a backup)"
	@echo "make grade      grade students' lab notebooks, each in a sandbox: SUBMISSIONS=folder/ [OUT=gradebook/] (README)"
	@echo "make notebooks  rewrite the .ipynb copies from the .md sources (plain Markdown, solutions with outputs)"
	@echo "make release    pin the Colab cells and badges to a tag: TAG=v0.2.0 [REPOSITORY=https://github.com/OWNER/NAME]"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP) grade-setup
	$(MAKE) test-fast
	$(MAKE) test-unit
	$(MAKE) test-notebooks
	$(MAKE) test-browser

# The tiers: every test runs in exactly one of them.
# fast: pure functions, shapes, errors (under a minute on 2 cores); stops at the first failure.
FAST := not slow and not notebook and not serial and not browser and not colab
test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -n $(JOBS) --dist loadfile -m "$(FAST)" tests

# slow: parity with transformers, training runs, script smoke runs and torchrun, two processes.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile -m "slow and not notebook and not serial and not browser and not colab" tests

# Notebooks one at a time, so that each one's time is what a 2-core laptop sees:
# lectures are executed, solutions are compared with their recorded check output,
# and the generated labs are executed and must report every exercise as not done.
# Then the timing-sensitive tests (marker `serial`: CPU throughput against transformers).
test-notebooks: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env lectures/*.ipynb solutions/*.ipynb
	$(BIN)/python -m pytest -m "notebook or serial" tests

# The course in real clients (tests marked `browser` and `colab`, a few minutes): a lecture and a
# lab run in JupyterLab and a lecture exported to HTML, in headless Chromium (screenshots in
# _build/screenshots/); the Colab install cell in a fresh virtual environment.
.PHONY: test-browser browser-setup
test-browser: $(STAMP) browser-setup
	$(BIN)/python -m pytest -p no:cacheprovider -m "browser or colab" tests

# Debian's chromium for the browser tests (CI runs as root; elsewhere apt-get asks through sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser-setup:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Debian's bubblewrap, the grader's sandbox (and the grading tests').
grade-setup:
	@command -v bwrap >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap; }

# The HTML book in _build/html: with the MyST book theme when it can be downloaded, otherwise
# (offline, CI) a static site rendered from MyST's content by scripts/static_book.mjs (Node.js;
# `npm ci` of package.json's pinned packages on first use). NO_EXECUTE=1: no notebook is executed.
book: $(STAMP)
	$(BIN)/python scripts/build_book.py $(if $(NO_EXECUTE),--no-execute,) $(if $(OFFLINE),--offline,)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

labs: $(STAMP)
	$(BIN)/python -m grading.labs $(if $(FORCE),--force,)

# Grade a folder of students' lab notebooks (instructors): make grade SUBMISSIONS=path/ [OUT=gradebook/] [LAB=01]
# Each notebook runs in a bubblewrap sandbox (README, "For instructors: grading").
.PHONY: grade grade-setup
grade: $(STAMP) grade-setup
	$(if $(SUBMISSIONS),,$(error give the submissions: make grade SUBMISSIONS=path/to/folder))
	$(BIN)/python -m grading.grade $(SUBMISSIONS) --out $(or $(OUT),gradebook) --jobs $(JOBS) $(if $(LAB),--lab $(LAB),)

# The .ipynb copies students open, written by grading/notebooks.py: MyST rewritten into plain
# Markdown; solutions keep their outputs when their code is unchanged, and are executed otherwise.
notebooks: $(STAMP)
	$(BIN)/python -m grading.notebooks
	$(MAKE) labs

# Pin the course to a release: make release TAG=v0.2.0 [REPOSITORY=https://github.com/you/fork]
# rewrites release.toml, every Colab install cell and badge, then the notebooks (README, "Publishing").
.PHONY: release
release: $(STAMP)
	$(if $(TAG),,$(error give the tag: make release TAG=v0.2.0 [REPOSITORY=https://github.com/OWNER/NAME]))
	$(BIN)/python scripts/release.py --tag $(TAG) $(if $(REPOSITORY),--repository $(REPOSITORY),)
	$(MAKE) notebooks
	$(BIN)/python scripts/release.py --check

clean:
	rm -rf _build .pytest_cache node_modules
