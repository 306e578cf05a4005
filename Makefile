# make test : create/reuse .venv, install pinned dependencies, run every test.
# make demo : (arrives with the demo model) set up and run the main job on the shipped demo checkpoint.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test clean-venv

$(STAMP): setup.cfg requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test,aot]"
	# taming-transformers' own metadata pulls in unrelated packages; its Encoder/Decoder/VectorQuantizer need only torch.
	$(PY) -m pip install -q --no-deps taming-transformers==0.0.1
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
