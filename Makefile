# make test : create/reuse .venv, install pinned dependencies (and Debian's chromium for the browser tests), run every test.
# make demo : create/reuse .venv, then generate a few PNGs with the shipped demo checkpoint (lumina_jax/demo_weights).
# make serve : the web demo and HTTP API on the shipped demo model, at http://127.0.0.1:7860 (SERVE_ARGS adds flags).
# make demo-weights : run the whole demo recipe (python -m lumina_jax.demo.recipe) and ship its result.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test clean-venv demo demo-weights serve

$(STAMP): setup.cfg requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test,aot,serve]"
	# taming-transformers' own metadata pulls in unrelated packages; its Encoder/Decoder/VectorQuantizer need only torch.
	$(PY) -m pip install -q --no-deps taming-transformers==0.0.1
	touch $(STAMP)

venv: $(STAMP)

# The browser tests drive Debian's chromium through Playwright (never a downloaded browser); installing it
# needs root, as CI runs.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# Two pytest workers for most tests (tests marked with one xdist_group share a worker, e.g. one server); the
# multi-process tests run afterwards on their own (exit 5 = none selected).
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -ra -n 2 --dist loadgroup -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest -q -ra -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

DEMO_OUT ?= demo_out
DEMO_PROMPT ?= a red circle on a blue background
demo: $(STAMP)
	$(PY) infer.py --prompt "$(DEMO_PROMPT)" --size 128x128 --num-images 4 --seed 0 --cfg 3 --cfg-min-p 0.05 \
		--image-top-k 16 --max-new-tokens 128 --out $(DEMO_OUT)
	@echo "demo images: $(abspath $(DEMO_OUT))/*.png"

SERVE_ARGS ?=
serve: $(STAMP)
	$(PY) -m lumina_jax.serve $(SERVE_ARGS)

DEMO_RUN ?= runs/demo
demo-weights: $(STAMP)
	nice -n 10 $(PY) -m lumina_jax.demo.recipe --out $(DEMO_RUN) --seed 0
	rm -rf lumina_jax/demo_weights
	cp -r $(DEMO_RUN)/model lumina_jax/demo_weights
	@echo "shipped $(DEMO_RUN)/model as lumina_jax/demo_weights ($$(du -sh lumina_jax/demo_weights | cut -f1))"

clean-venv:
	rm -rf $(VENV)
