# The two commands of the README. Both set up .venv on first use (a few minutes) and are no-ops
# for the environment afterwards (scripts/setup_env.sh keeps a stamp of the lock it installed).
#
#   make demo   # main job, end to end on the embedded defaults (configs/demo.yaml)
#   make test   # the test suite, as CI runs it (.ci/run calls this)

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
OVERRIDES ?=

.PHONY: env demo test services-start services-status services-stop dataset

env:
	@bash scripts/setup_env.sh

demo: env
	@bash scripts/run_demo.sh $(CONFIG) $(OVERRIDES)

test: env
	@$(PY) -m pytest $(PYTEST_ARGS)

services-start: env
	@$(PY) -m notellm.cli services start --config $(CONFIG)

services-status: env
	@$(PY) -m notellm.cli services status --config $(CONFIG)

services-stop: env
	@$(PY) -m notellm.cli services stop --config $(CONFIG)

dataset: env
	@$(PY) -m pipelines.convert_stackexchange --config $(CONFIG)
