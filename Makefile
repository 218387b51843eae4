# One command each, set-up included:
#
#   make train    create .venv (the CPU or CUDA build of torch for this machine), install the package, train the
#                 tiny preset (ARGS="--gduf.steps 200" passes options to python -m unigendet.train)
#   make test     the same environment plus Triton and the test tools, then the test suite (ARGS="-k detect")
#   make setup    only the environment (everything `make test` needs)
#
# Variables: PYTHON (python3), VENV (.venv), TORCH_SPEC, TORCH_INDEX_URL, UNIGENDET_EXTRAS (see
# scripts/setup-venv.sh).

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
export PYTHON VENV

.PHONY: setup train test

setup:
	@scripts/setup-venv.sh all

train:
	@scripts/setup-venv.sh train
	$(VENV)/bin/python -m unigendet.train $(ARGS)

test:
	@scripts/setup-venv.sh test
	$(VENV)/bin/python -m pytest tests -q $(ARGS)
