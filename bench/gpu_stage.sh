#!/usr/bin/env bash
# The GPU measurements, run on the device machine in stages (the default model travels in two
# halves because one call carries at most 64 MiB). Usage: bash bench/gpu_stage.sh STAGE
#   1: keep the first half, install the gguf wheel, 2:4 sparse kernel benchmark
#   2: join the model, build the reference, gradient-checkpointing memory, GPTQ wall time on CUDA
#   spec3: (keeps the first half) issue 19 after the verify-attention race fix: the CUDA tests of the static
#          decoder, fused kernels, static speculators and EAGLE heads
#   spec4: join the model; an EAGLE head trained 5 min on the target's 16,000 answers (carried back as a tar)
#   spec5: (after spec4) the head and prompt lookup in the static speculator, k = 1..3, held-out chat prompts
#   spec6a / spec6: (the first half and .gpu/a/eagle-long.tar; then .gpu/b, .whl, artifacts/gpu_like) the server
#          on the real target with and without the EAGLE head (k = 2) through HTTP at concurrency 1, 8 and 64
#   spec7: (carry .gpu/a/eagle-long.tar, .whl, artifacts/gpu_like) an EAGLE head's features from the token-rows
#          step: the CUDA tests, then the server on random weights of the real shape with and without the head
#          at concurrency 1 and 8 (acceptance meaningless there: the step costs)
#   spec8: the serving core with an EAGLE head against none, in-process, random weights, profiled at 1 and 8
#          clients (bench/speculative_serving.py); the CUDA tests of heads and the scheduler
#   spec9a / spec9: (carry .gpu/a with eagle-long.tar / .gpu/b, .whl, artifacts/gpu_like) the head's passes as
#          CUDA graphs, speculative steps in 4- and 8-row graphs: tests and the serving core on random weights,
#          then the real model served over HTTP with and without the trained head at 1, 8 and 64 clients
#   spec10a / spec10: the same served comparison with k = 1 (one head pass per cycle)
#   spec11: (carry .whl, artifacts/gpu_like; ran at commit f4b3c0c, whose pinned host copies were then reverted and
#          with them --pageable-too) CUDA tests, the serving core with and without the head, the verify pass at
#          2..8 rows
#   spec12a / spec12: the real model served over HTTP with and without the head (k = 2)
#   spec14a / spec14: (carry .gpu/a with eagle-long.tar and answers.jsonl.gz / .gpu/b, .whl) the static decoder's
#          EAGLE cycles with 8, 2 and 1 cycles between looks at the output (end of turn), k = 1 and 2
#   spec13: the CUDA tests of heads, head rows, engine (draft trees), scheduler (its drafting split out) and
#          paged kernels
#   exit2a / exit2: (carry .gpu/a / .gpu/b, .whl, artifacts/gpu_like) the CUDA tests of the static decoder's
#          speculators (the KV-sharing exit cycle among them); then two exit heads (after layer 8 and 15) trained
#          side by side on the target's answers, each on the static decoder (fused + graphs) at k = 1..3
#   exit3a / exit3: (as exit2a / exit2) early-exit drafts (the target's first 4 and 6 layers, distilled on its
#          answers side by side), each on the static decoder at k = 1..3 (a draft model with its own cache)
#   3: distillation of the 15-layer student on the H200 (bf16-mixed), held-out metrics
#   paged: CUDA tests of the batched paged decode attention; engine decode steps, batched vs per sequence
#   serve1 / serve2 / serve3: GPU serving (issue 17), in two calls (serve3: the final figures, shorter): CUDA tests of the paged kernels, fused step, scheduler and
#          sampler; engine decode steps three ways + profile; the serving core in-process (greedy and
#          sampled); then HTTP with runtime.bench (random weights of the real shape, artifacts/gpu_like
#          carried: config, tokenizer, corpus; .whl carried: fastapi, uvicorn, pydantic) at 64 clients and
#          at concurrency 1, beside the static decoder at batch 1 (`runtime.generate --static`)
#   serve4: issue 17's third step (carry artifacts/gpu_like and .whl): scheduler tests on CUDA, the serving core
#          in-process with its steps by kind, HTTP at 64 clients with the new server defaults and the old ones
#          (asyncio, h11, Python's 5 ms GIL switch) interleaved, concurrency 1 beside runtime.generate --static
#   serve5 / serve6: issue 17's prompt-chunk fixes: the prefill pass five ways, the serving core, HTTP with the
#          engine process and with the thread, concurrency 1 (serve6: short, HTTP and the CUDA chunk tests only)
#   serve7: issue 17, steps with prompt chunks as token rows of the decode kernels (carry artifacts/gpu_like, .whl):
#          CUDA tests, the prefill pass, the serving core (token rows vs padded), HTTP at 64 clients and at 1
#   serve8: issue 17, HTTP at 64 clients from one client process and from four, CPU share of each process
#   serve9: issue 17, final figures: CUDA tests, the serving core, HTTP at 64 clients (four client processes and
#          one), concurrency 1 beside the static decoder on the same prompts
#   serve10: issue 17, token rows with one table per sequence: tests, prefill, serving core, HTTP, concurrency 1
#   serve11: issue 17, short: the cuBLAS path's epilogues fused; test, serving core, HTTP at 64 clients
#   serve12: issue 17, HTTP at 64 clients with 1, 2 and 4 front-end processes over the one engine process
#          (`--api-processes`), 4 and 8 client processes; the token-rows CUDA tests
#   serve13: issue 17, final: CUDA tests of the paged kernels and scheduler; HTTP at 64 clients with the server's
#          defaults (two front ends on CUDA) twice; concurrency 1 beside the static decoder
#   prefill: the prompt-chunk pass timed (fused or modules, chunks together or per sequence) and profiled
#   decode: CUDA tests of the static decoder and the decode benchmark (no model file needed)
#   fused: CUDA tests and the tile sweep + benchmark of the fused Triton step (no model file needed)
#   fused2: the same benchmark with the chosen tiles, no sweep
#   a / real: keep the first half / join it and time the fixed decoder on the real weights
#   r1: keep the first half; CUDA tests of the runtime; decode benchmark on SmolLM2-shaped random weights
#   r2: join the model; decode benchmark on the real weights (+ greedy check); server load test;
#       chat data (the target's answers) for the speculative draft
#   r3: distil the chat draft, then speculative decoding with it in the engine
#   test: CUDA tests of the static decoder, fused kernels and static speculator (no model file needed)
#   spec0: keep the first half, then the same tests
#   spec1: join the model; chat data from the static decoder; 2- and 4-layer chat drafts distilled side by side
#   eagle0 / eagle1 / eagle2: EAGLE heads (tests; two heads trained and benchmarked; benchmark only)
#   eagle3 / eagle4: the verify pass's rows in one reduction vs one after another; a longer-trained head
#   eagle5: (after a) the longer-trained head with both verify kernels on the real target
#   exit1: (after a) an early-exit draft of 6 layers, and compress.evaluate's early-exit curve with it
#   verify: the verify pass's kernel choices against a decode step (random weights of the real shape)
#   spec2: speculative decoding with each draft on the static decoder (fused + graphs; each verify kernel
#          choice), the CLI, and the paged engine
set -euo pipefail
W=/tmp/w
mkdir -p "$W" "${OUT:-/tmp/out}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SHRINKWRAP_CORPUS_FILE=$W/lee_background.cor
if [ -f artifacts/gpu_like/lee_background.cor ]; then cp artifacts/gpu_like/lee_background.cor "$W"/; fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
join_reference() {  # the GGUF's two halves (.gpu/a kept by an earlier call, .gpu/b carried now) -> $W/reference
  cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/whl/*.whl  # gguf
  python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 \
    | tail -1
}
http64() {  # the server under 64 HTTP clients (random weights in $W/random); $1: name, $2: server flags,
            # $3: client processes (default 1)
  python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 64 --requests 512 --prompt-len 128 \
    --max-tokens 128 --max-running 64 --max-batch-tokens 1024 --no-baseline --server-args="$2" \
    --client-processes "${3:-1}" \
    --out "$OUT/serve-cuda-64-$1.json" 2>&1 | grep -v -i "warn\|it/s"
}
serve_concurrency1() {  # one client through HTTP, beside the static decoder at batch 1 on the same prompts
  python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 1 --requests 8 --prompt-len 128 \
    --max-tokens 128 --max-running 64 --no-baseline --static-baseline --out "$OUT/serve-cuda-1.json" 2>&1 | grep -v -i "warn\|it/s"
  python3 -m runtime.generate --artifact "$W/random" --static --device cuda --max-tokens 128 \
    --prompt "The fire service says the blaze near the town is now under control, and residents" 2>&1 | tail -1
}
served_real() {  # the real model ($W/reference) over HTTP with and without the head ($W/eagle-long);
                 # $1: k, then "clients arm" pairs (arm: plain or eagle)
  local k=$1 run c arm n
  shift
  for run in "$@"; do
    read -r c arm <<< "$run"
    n=$((c == 1 ? 8 : c * 4))
    flags=(); [ "$arm" = eagle ] && flags=(--draft "$W/eagle-long" --k "$k" --force)
    timeout 100 python3 -m runtime.bench --artifact "$W/reference" --device cuda --concurrency "$c" --requests "$n" \
      --prompt-len 128 --max-tokens 128 --max-running 64 --max-batch-tokens 1024 --no-baseline "${flags[@]}" \
      --out "$OUT/serve-c$c-$arm-k$k.json" 2>&1 | grep -v -i "warn\|it/s" | grep -v "^CPU" | tail -4 || true
  done
}
two_drafts() {  # two drafts trained side by side on one GPU ($MINUTES each), the second on the first's answers;
               # $1: method, $2: name prefix ($W/<prefix><layers>), $3: learning rate, $4 $5: their --layers
  local method=$1 name=$2 lr=$3 first=$4 second=$5
  train() {
    timeout 300 python3 -m compress.draft --target "$W/reference" --method "$method" --layers "$1" \
      --out "$W/$name$1" --prompts 16000 --answer-tokens 128 --eval-prompts 8 --k 3 --seq-len 512 --batch-size 16 \
      --max-steps 40000 --max-minutes "${MINUTES:-2.5}" --lr "$lr" --no-gradient-checkpointing --accelerator gpu \
      --overwrite > "$OUT/$name$1.log" 2>&1 || true
  }
  train "$first" &
  for _ in $(seq 150); do ls "$W/$name$first.work"/target-answers-*.jsonl > /dev/null 2>&1 && break; sleep 2; done
  mkdir -p "$W/$name$second.work" && cp "$W/$name$first.work"/target-answers-*.jsonl "$W/$name$second.work/"
  train "$second" &
  wait
}
case "$1" in
  1)
    cp .gpu/a/* "$W"/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)'
    python3 bench/sparse24.py --dtype float16 | tee "$OUT/sparse24.log"
    ;;
  2)
    cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$W" && sed 's#  .*/#  #' gguf.sha256 | sha256sum -c -)
    time python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 | grep -v it/s
    python3 bench/grad_checkpointing.py --teacher "$W/reference" --device cuda --batch 8 --seq-len 512 --steps 6
    /usr/bin/time -f "gptq wall %e s" python3 -m compress.quantize --artifact "$W/reference" --method gptq --no-sym \
      --no-desc-act --device cuda --out "$W/gptq" --overwrite 2>&1 | grep -v "it/s\]" | tail -2
    cp "$W/gptq/shrinkwrap.json" "$OUT/gptq.json"
    ;;
  quantize)
    # every quantization variant of issue 5, quantized and evaluated (accuracy only) on the GPU
    cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 | tail -1
    python3 bench/quantize.py --reference "$W/reference" --work "$W/quantize" --device cuda --no-speed 2>&1 \
      | grep -v "it/s\]" | tail -30
    ;;
  r1)
    cp .gpu/a/* "$W"/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_static_decode.py 2>&1 | tail -3
    python3 bench/gpu_decode.py --repeats 3 2>&1 | grep -v Warning
    ;;
  paged)
    # batched paged decode attention: CUDA tests, then the engine's decode steps, batched kernel vs per sequence
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py 2>&1 | grep -E "^E |passed|failed" \
      | head -20 || true
    python3 bench/paged_decode.py --device cuda --batches 1 8 64 128 --steps 32 2>&1 | grep -v Warning
    cp artifacts/bench/paged_decode.json "$OUT"/
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --baseline-requests 64 2>&1 \
      | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    ;;
  serve1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_paged_attention.py \
      tests/runtime/test_sampling.py tests/runtime/test_scheduler.py 2>&1 | grep -E "^E |passed|failed" | head -20 || true
    python3 bench/paged_decode.py --device cuda --batches 1 8 64 128 --steps 32 2>&1 | grep -v Warning
    cp artifacts/bench/paged_decode.json "$OUT"/
    ;;
  serve2)
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_paged_attention.py \
      tests/runtime/test_sampling.py tests/runtime/test_scheduler.py 2>&1 | grep -E "^E |passed|failed" | head -20 || true
    python3 bench/paged_decode.py --device cuda --batches 64 --steps 16 2>&1 | grep -v Warning
    cp artifacts/bench/paged_decode.json "$OUT"/paged_decode_64.json
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --baseline-requests 16 2>&1 \
      | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    for steps in 8 1; do
      python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 64 --requests 512 --prompt-len 128 \
        --max-tokens 128 --max-running 64 --max-batch-tokens 1024 --decode-steps $steps --baseline-requests 4 \
        --out "$OUT/serve-cuda-64-steps$steps.json" 2>&1 | grep -v -i "warn\|it/s"
    done
    python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 1 --requests 8 --prompt-len 128 \
      --max-tokens 128 --max-running 64 --no-baseline --out "$OUT/serve-cuda-1.json" 2>&1 | grep -v -i "warn\|it/s"
    for i in 1 2; do
      python3 -m runtime.generate --artifact "$W/random" --static --device cuda --max-tokens 128 \
        --prompt "The fire service says the blaze near the town is now under control, and residents" 2>&1 | tail -1
    done
    ;;
  serve3)
    # the final measurement of issue 17 in one short call (the device budget's last minutes)
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_paged_attention.py \
      tests/runtime/test_scheduler.py 2>&1 | grep -E "^E |passed|failed" | head -20 || true
    python3 bench/paged_decode.py --device cuda --batches 1 64 --steps 16 2>&1 | grep -v Warning
    cp artifacts/bench/paged_decode.json "$OUT"/
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --baseline-requests 8 2>&1 \
      | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 64 --requests 512 --prompt-len 128 \
      --max-tokens 128 --max-running 64 --max-batch-tokens 1024 --baseline-requests 2 \
      --out "$OUT/serve-cuda-64.json" 2>&1 | grep -v -i "warn\|it/s"
    python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency 1 --requests 8 --prompt-len 128 \
      --max-tokens 128 --max-running 64 --no-baseline --out "$OUT/serve-cuda-1.json" 2>&1 | grep -v -i "warn\|it/s"
    python3 -m runtime.generate --artifact "$W/random" --static --device cuda --max-tokens 128 \
      --prompt "The fire service says the blaze near the town is now under control, and residents" 2>&1 | tail -1
    ;;
  serve4)
    # issue 17, third step: bursts between prompt chunks; the HTTP side's event loop, parser and GIL hand-over
    python3 -c 'import uvloop, httptools; print("uvloop", uvloop.__version__, "httptools", httptools.__version__)'
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_scheduler.py \
      tests/runtime/test_paged_attention.py 2>&1 | grep -E "^E |passed|failed" | head -20 || true
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 \
      --runs batched chunks_per_sequence single_step static_decode \
      2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 new-1 "--gil-switch-ms 0.5"
    http64 old-1 "--loop asyncio --http h11 --gil-switch-ms 5"
    http64 new-2 "--gil-switch-ms 0.5"
    http64 old-2 "--loop asyncio --http h11 --gil-switch-ms 5"
    serve_concurrency1
    ;;
  serve5)
    # issue 17, the prompt-chunk fix: the prefill pass five ways; the serving core; HTTP at 64 clients and at 1
    python3 bench/prefill.py --device cuda --prompts 1 16 32 --repeats 5 2>&1 | grep -v -i "warn\|USDT"
    cp artifacts/bench/prefill.json "$OUT"/
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --runs batched single_step static_decode \
      2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 engine-process "--engine-process"
    http64 no-engine-process "--no-engine-process"
    serve_concurrency1
    ;;
  serve6)
    # issue 17, last and short: HTTP at 64 clients (engine process), the CUDA tests of the prompt-chunk path,
    # concurrency 1 beside runtime.generate --static
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 default "--engine-process"
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py -k "fused or chunks" 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    serve_concurrency1
    ;;
  serve7)
    # issue 17, prompt chunks as token rows of the decode kernels (graphs per token-count bucket): CUDA tests,
    # the prefill pass six ways, the serving core (token rows vs the padded batch), HTTP at 64 clients and at 1
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py tests/runtime/test_scheduler.py \
      -k "cuda or fused or chunks or token_rows or warm" 2>&1 | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/prefill.py --device cuda --prompts 1 4 16 32 --repeats 5 2>&1 | grep -v -i "warn\|USDT"
    cp artifacts/bench/prefill.json "$OUT"/
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --runs batched padded_chunks \
      static_decode 2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 token-rows "--engine-process"
    serve_concurrency1
    ;;
  serve8)
    # issue 17: who limits HTTP (CPU share of client, server, engine process): one client process vs four
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py -k "token_rows" 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 one-client "--engine-process" 1
    http64 four-clients "--engine-process" 4
    http64 four-clients-thread "--no-engine-process" 4
    ;;
  serve9)
    # issue 17, final figures: CUDA tests; the serving core in-process; HTTP at 64 clients from four client
    # processes and from one; concurrency 1 beside the static decoder on the same prompts
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py tests/runtime/test_scheduler.py \
      2>&1 | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --runs batched padded_chunks \
      static_decode 2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 four-clients "--engine-process" 4
    http64 one-client "--engine-process" 1
    serve_concurrency1
    ;;
  serve10)
    # issue 17: token rows reading one table per sequence, attention in 64-position tiles: CUDA tests, the
    # prefill pass, the serving core, HTTP at 64 clients (four client processes), concurrency 1
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/prefill.py --device cuda --prompts 1 4 16 --repeats 5 2>&1 | grep -v -i "warn\|USDT"
    cp artifacts/bench/prefill.json "$OUT"/
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --runs batched static_decode \
      2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 four-clients "--engine-process" 4
    serve_concurrency1
    ;;
  serve11)
    # issue 17, short: the cuBLAS path's epilogues in few kernels (RMSNorm kernel, bf16 residual/SwiGLU): its CUDA
    # test, the serving core, HTTP at 64 clients (four client processes)
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_decode.py -k equals_unfused 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/scheduler_load.py --device cuda --clients 64 --requests 512 --runs batched 2>&1 | grep -v Warning
    cp artifacts/bench/scheduler_load.json "$OUT"/
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 four-clients "--engine-process" 4
    ;;
  serve12)
    # issue 17: several HTTP front ends over the one engine process, interleaved with one, at 4 and 8 client processes
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py -k "token_rows" 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 api1-c4 "--engine-process" 4
    http64 api2-c4 "--api-processes 2" 4
    http64 api2-c8 "--api-processes 2" 8
    http64 api4-c8 "--api-processes 4" 8
    http64 api1-c8 "--engine-process" 8
    http64 api2-c4-again "--api-processes 2" 4
    ;;
  serve13)
    # issue 17, final figures with the server's defaults (two HTTP front ends over the engine process on CUDA)
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_paged_attention.py tests/runtime/test_scheduler.py \
      2>&1 | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    http64 defaults-1 "" 4
    http64 defaults-2 "" 4
    serve_concurrency1
    ;;
  prefill)
    # the prompt-chunk pass (the server's mixed steps) timed four ways and profiled
    python3 bench/prefill.py --device cuda --prompts 1 16 32 --repeats 5 2>&1 | grep -v -i "warn\|USDT"
    cp artifacts/bench/prefill.json "$OUT"/
    ;;
  decode)
    # the decode benchmark alone (SmolLM2-shaped random weights: speed does not depend on their values)
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_static_decode.py 2>&1 | tail -3
    python3 bench/gpu_decode.py --repeats 3 2>&1 | grep -v Warning
    ;;
  fused)
    # the fused Triton decode step: CUDA tests, tile sweep, benchmark against the compiled step and HF
    python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_static_decode.py \
      tests/runtime/test_triton_decode.py 2>&1 | tail -3 || true
    python3 bench/gpu_decode.py --sweep --repeats 2 --engines hf-generate hf-generate-static-cache \
      ours-cuda-graph+compile ours-triton+cuda-graph 2>&1 | grep -v -i warn | grep -v "^---\|Self CPU %\|^Self"
    ;;
  fused2)
    # the fused step with the tiles the sweep chose (no sweep): the interleaved comparison alone
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_decode.py 2>&1 | tail -1 || true
    python3 bench/gpu_decode.py --repeats 3 --engines hf-generate hf-generate-static-cache \
      ours-cuda-graph+compile ours-triton+cuda-graph 2>&1 | grep -v -i warn | grep -v "^---\|Self CPU %\|^Self"
    ;;
  a)
    cp .gpu/a/* "$W"/
    ;;
  real)
    # the fixed decoder on the real weights: greedy agreement with HF and speed
    cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 | tail -1
    python3 bench/gpu_decode.py --model "$W/reference" --repeats 2 --engines hf-generate ours-cuda-graph+compile \
      ours-triton+cuda-graph 2>&1 | grep -v -i warn | grep -v "^---\|Self CPU %\|^Self" | head -24
    ;;
  r2)
    cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 | tail -1
    OUT="$OUT/real" python3 bench/gpu_decode.py --model "$W/reference" --repeats 2 2>&1 | grep -v Warning | head -40
    python3 -m runtime.bench --artifact "$W/reference" --device cuda --concurrency 64 --requests 64 \
      --prompt-len 128 --max-tokens 64 --max-running 64 --out "$OUT/serve-cuda.json" 2>&1 | tail -4
    python3 bench/chat_draft_data.py --teacher "$W/reference" --out "$W/chat.jsonl" --batch-size 96 2>&1 | tail -1
    ;;
  r3)
    python3 -m compress.distill --config configs/distill/smollm2-half.yaml --teacher "$W/reference" \
      --data "$W/chat.jsonl" --out "$W/draft" --overwrite --accelerator gpu --batch-size 16 --grad-accum 1 --max-steps 1200 \
      --max-minutes 3 --val-every 400 --ckpt-every 600 --warmup-steps 50 2>&1 | grep -v "it/s\]" | tail -6
    python3 bench/engine.py --target "$W/reference" --draft "$W/draft" --device cuda --prompts 8 --new-tokens 128 2>&1 | tail -3
    ;;
  test|spec0)
    if [ "$1" = spec0 ]; then cp .gpu/a/* "$W"/; fi
    python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_static_decode.py \
      tests/runtime/test_triton_decode.py tests/runtime/test_static_speculative.py 2>&1 | tail -4 || true
    ;;
  spec1)
    cat "$W/gguf.part00" .gpu/b/gguf.part01 > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m compress.reference --model "$W/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$W/reference" --if-missing 2>&1 | tail -1
    time python3 bench/chat_draft_data.py --teacher "$W/reference" --out "$W/chat.jsonl" --offsets 9 --instructions 7 \
      2>&1 | tail -1
    for layers in 2 4; do
      python3 -m compress.distill --config configs/distill/chat-draft.yaml --teacher "$W/reference" \
        --data "$W/chat.jsonl" --out "$W/draft$layers" --student-layers "$layers" --overwrite --accelerator gpu \
        --eval-windows 2 > "$OUT/distill$layers.log" 2>&1 &
    done
    wait
    for layers in 2 4; do grep -v "it/s\]" "$OUT/distill$layers.log" | tail -1; done
    ;;
  eagle0)
    # EAGLE heads: the CUDA tests (fused head layer, graphs), and compress.draft --method eagle + runtime.generate
    # --static on a tiny artifact with the GPU trainer (bf16-mixed)
    cp .gpu/a/* "$W"/
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_eagle.py tests/runtime/test_static_speculative.py \
      tests/train/test_eagle.py ${EAGLE0_TESTS:-} 2>&1 | tail -15 || true
    python3 -c "import sys; from pathlib import Path; sys.path.insert(0, '.')
from tests.conftest import make_tiny_llama, make_tiny_tokenizer, save_reference
t = make_tiny_tokenizer(); save_reference(Path('$W/tiny'), make_tiny_llama(vocab_size=len(t)), t)"
    python3 -m compress.draft --config configs/draft/smoke-eagle.yaml --target "$W/tiny" --out "$W/tiny-eagle" \
      --accelerator gpu --overwrite 2>&1 | grep -v -i "warn\|it/s\]" | tail -3
    python3 -m runtime.generate --artifact "$W/tiny" --draft "$W/tiny-eagle" --static --device cuda --k 3 \
      --prompt "The river rose after the storm" --max-tokens 24 2>&1 | tail -2
    ;;
  eagle1)
    # the real target: two EAGLE heads trained side by side (teacher features only; 3 unrolled steps of its own
    # features), then each in the static speculator (fused + graphs) at k = 1..4, whole and reduced draft vocabulary
    join_reference
    for u in 1 3; do
      timeout 360 python3 -m compress.draft --target "$W/reference" --method eagle --out "$W/eagle-u$u" --prompts 8000 \
        --answer-tokens 128 --eval-prompts 8 --k 3 --seq-len 512 --batch-size 16 --max-steps 6000 --max-minutes "${MINUTES:-3.5}" \
        --lr 1e-3 --unroll "$u" --no-gradient-checkpointing --accelerator gpu --overwrite > "$OUT/eagle-u$u.log" 2>&1 &
    done
    wait
    for u in 1 3; do grep -v -i "warn\|it/s\]" "$OUT/eagle-u$u.log" | tail -2; done
    ;;&
  eagle1|eagle2)
    cp "$(ls "$W"/eagle-u1.work/target-answers-*.jsonl | head -1)" "$OUT/answers.jsonl"
    for u in 1 3; do
      [ -d "$W/eagle-u$u" ] || continue
      tar -C "$W" -cf "$OUT/eagle-u$u.tar" "eagle-u$u"
      OUT="$OUT/u$u" timeout 150 python3 bench/static_speculative.py --target "$W/reference" --draft "$W/eagle-u$u" \
        --device cuda --k 1 2 3 4 --draft-vocab 0 8192 --vocab-from "$OUT/answers.jsonl" --new-tokens 128 2>&1 \
        | grep -v -i "warn\|Loading weights" | tail -19
    done
    ;;
  eagle3)
    # the verify pass with all rows in one reduction (gemv-rows) against the row-by-row GEMV, with the head of
    # round 2 (carried: .gpu/b/eagle-u1, answers.jsonl.gz); then a head trained on twice the prompts, longer
    join_reference
    gunzip -c .gpu/b/answers.jsonl.gz > "$W/answers.jsonl"
    OUT="$OUT/u1" timeout 170 python3 bench/static_speculative.py --target "$W/reference" --draft .gpu/b/eagle-u1 \
      --device cuda --k 1 2 3 --small gemv gemv-rows --draft-vocab 8192 --vocab-from "$W/answers.jsonl" \
      --new-tokens 128 2>&1 | grep -v -i "warn\|Loading weights" | tail -9
    timeout 400 python3 -m compress.draft --target "$W/reference" --method eagle --out "$W/eagle-long" \
      --prompts "${PROMPTS:-16000}" --answer-tokens 128 --eval-prompts 8 --k 3 --seq-len 512 --batch-size 16 \
      --max-steps 20000 --max-minutes "${MINUTES:-4.5}" --lr 1e-3 --no-gradient-checkpointing --accelerator gpu \
      --overwrite > "$OUT/eagle-long.log" 2>&1 || true
    grep -v -i "warn\|it/s\]" "$OUT/eagle-long.log" | tail -4
    [ -d "$W/eagle-long" ] && tar -C "$W" -cf "$OUT/eagle-long.tar" eagle-long
    ;;
  eagle4)
    # the longer-trained head of eagle3, both verify kernels
    OUT="$OUT/long" timeout 240 python3 bench/static_speculative.py --target "$W/reference" --draft "$W/eagle-long" \
      --device cuda --k 1 2 3 4 --small gemv gemv-rows --draft-vocab 0 8192 --vocab-from "$W/answers.jsonl" \
      --new-tokens 128 2>&1 | grep -v -i "warn\|Loading weights" | tail -19
    ;;
  eagle5)
    # the real target with the longer-trained head (carried: .gpu/b/eagle-long), verify rows one after another
    # vs together (after `a`)
    join_reference
    gunzip -c .gpu/b/answers.jsonl.gz > "$W/answers.jsonl"
    OUT="$OUT/long" timeout 300 python3 bench/static_speculative.py --target "$W/reference" --draft .gpu/b/eagle-long \
      --device cuda --k 1 2 3 4 --small gemv gemv-rows --draft-vocab 8192 --vocab-from "$W/answers.jsonl" \
      --new-tokens 128 2>&1 | grep -v -i "warn\|Loading weights" | tail -19
    ;;
  exit1)
    # (after a) an early-exit draft (the target's first 6 layers + its norm and LM head, distilled) for the lossy
    # early-exit curve, which compress.evaluate measures on the CPU
    join_reference
    timeout 200 python3 -m compress.draft --target "$W/reference" --method early-exit --layers 6 --out "$W/exit6" \
      --prompts 4000 --answer-tokens 128 --eval-prompts 4 --k 3 --seq-len 512 --batch-size 16 --max-steps 20000 \
      --max-minutes 1.8 --lr 5e-4 --no-gradient-checkpointing --accelerator gpu --overwrite > "$OUT/exit6.log" 2>&1 || true
    grep -v -i "warn\|it/s\]" "$OUT/exit6.log" | tail -3
    timeout 150 python3 -m compress.evaluate --reference "$W/reference" --artifacts "$W/reference" --early-exit "$W/exit6" \
      --exit-thresholds 0.5 0.7 0.8 0.9 0.95 --exit-prompts 4 --max-eval-tokens 8192 --device cuda --no-record \
      --out "$OUT/eval" 2>&1 | grep -v -i "warn\|it/s\]\|win/s\]" | tail -16
    ;;
  verify)
    # the verify pass's kernels: CUDA tests of the GEMV variants, then the sweep (random weights of the real shape)
    python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_decode.py tests/runtime/test_static_speculative.py \
      -k "fused_linear or argmax or fused_speculative or multi_row" 2>&1 | tail -2 || true
    python3 bench/verify_pass.py --like artifacts/gpu_like --k 1 2 3 4 2>&1 | grep -v -i warn
    ;;
  spec2)
    for layers in 2 4; do
      OUT="$OUT/draft$layers" python3 bench/static_speculative.py --target "$W/reference" --draft "$W/draft$layers" \
        --device cuda --k 1 2 3 4 --small gemv gemm gemm+pdl 2>&1 | grep -v -i "warn\|Loading weights"
    done
    python3 -m runtime.generate --artifact "$W/reference" --draft "$W/draft4" --k 3 --static --device cuda --chat \
      --max-tokens 64 --prompt "Summarize: the fire service says the blaze near the town is now under control." 2>&1 | tail -2
    OUT="$OUT/engine" python3 bench/engine.py --target "$W/reference" --draft "$W/draft4" --device cuda --prompts 4 \
      --new-tokens 64 --k 3 2>&1 | grep -v -i "warn\|Loading weights" | tail -3
    ;;
  spec3)
    cp .gpu/a/* "$W"/
    python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_static_speculative.py \
      tests/runtime/test_static_decode.py tests/runtime/test_triton_decode.py tests/runtime/test_eagle.py 2>&1 \
      | grep -E "^E |passed|failed|Error" | head -30 || true
    ;;
  spec4)
    join_reference
    timeout 480 python3 -m compress.draft --target "$W/reference" --method eagle --out "$W/eagle-long" \
      --prompts 16000 --answer-tokens 128 --eval-prompts 8 --k 3 --seq-len 512 --batch-size 16 \
      --max-steps 40000 --max-minutes "${MINUTES:-5}" --lr 1e-3 --no-gradient-checkpointing --accelerator gpu \
      --overwrite > "$OUT/eagle-long.log" 2>&1 || true
    grep -v -i "warn\|it/s\]" "$OUT/eagle-long.log" | tail -4
    cp "$(ls "$W"/eagle-long.work/target-answers-*.jsonl | head -1)" "$W/answers.jsonl"
    gzip -c "$W/answers.jsonl" > "$OUT/answers.jsonl.gz"
    [ -d "$W/eagle-long" ] && tar -C "$W" -cf "$OUT/eagle-long.tar" eagle-long
    ;;
  spec5)
    OUT="$OUT/long" timeout 420 python3 bench/static_speculative.py --target "$W/reference" --draft "$W/eagle-long" \
      --device cuda --k 1 2 3 --small gemv-rows --draft-vocab 8192 --vocab-from "$W/answers.jsonl" --lookup 2 3 \
      --new-tokens 128 2>&1 | grep -v -i "warn\|Loading weights" | tail -19
    ;;
  spec6a|spec10a)
    cp .gpu/a/gguf.* "$W"/
    tar -C "$W" -xf .gpu/a/eagle-long.tar
    ;;
  spec6|spec9)
    join_reference
    served_real 2 "1 plain" "1 eagle" "8 plain" "8 eagle" "64 plain" "64 eagle"
    ;;
  spec10)
    join_reference
    served_real 1 "1 plain" "1 eagle" "8 eagle" "64 eagle"
    ;;
  spec7)
    tar -C "$W" -xf .gpu/a/eagle-long.tar
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_paged_attention.py \
      tests/runtime/test_scheduler.py -k "eagle or token_rows or cuda" 2>&1 | grep -E "^E |passed|failed" | head -10 || true
    python3 bench/random_artifact.py --like artifacts/gpu_like --out "$W/random" 2>&1 | tail -1
    for c in 1 8; do
      for arm in plain eagle; do
        flags=(); [ "$arm" = eagle ] && flags=(--draft "$W/eagle-long" --k 2 --force)
        timeout 80 python3 -m runtime.bench --artifact "$W/random" --device cuda --concurrency "$c" --requests $((c * 4)) \
          --prompt-len 128 --max-tokens 64 --max-running 64 --max-batch-tokens 1024 --no-baseline "${flags[@]}" \
          --out "$OUT/serve-random-c$c-$arm.json" 2>&1 | grep -v -i "warn\|it/s" | grep "server" || true
      done
    done
    ;;
  spec11)
    timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_eagle.py \
      tests/runtime/test_eagle_rows.py tests/runtime/test_scheduler.py tests/runtime/test_paged_attention.py \
      tests/runtime/test_engine.py -k "eagle or rows or cuda or draft or greedy or tree" 2>&1 \
      | grep -E "^E |passed|failed" | head -10 || true
    timeout 240 python3 bench/speculative_serving.py --clients 1 8 64 --requests-per-client 2 --new-tokens 96 \
      --profile 1 2>&1 | grep -v -i "warn\|forward_call"
    cp artifacts/bench/speculative_serving.json "$OUT"/
    timeout 150 python3 bench/verify_pass.py --like artifacts/gpu_like --k 1 2 3 4 5 6 7 --choices rows-chosen 2>&1 \
      | grep -v -i warn
    cp artifacts/bench/verify-pass.json "$OUT"/ 2>/dev/null || true
    ;;
  spec14a)
    cp .gpu/a/gguf.* "$W"/
    tar -C "$W" -xf .gpu/a/eagle-long.tar
    gunzip -c .gpu/a/answers.jsonl.gz > "$W/answers.jsonl"
    ;;
  spec14)
    join_reference
    OUT="$OUT/long" timeout 420 python3 bench/static_speculative.py --target "$W/reference" --draft "$W/eagle-long" \
      --device cuda --k 1 2 --small gemv-rows --draft-vocab 8192 --vocab-from "$W/answers.jsonl" --new-tokens 128 \
      --stop-chunk 8 2 1 2>&1 | grep -v -i "warn\|Loading weights" | tail -12
    ;;
  exit2a)
    cp .gpu/a/gguf.* "$W"/
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_static_speculative.py \
      tests/runtime/test_static_decode.py tests/runtime/test_eagle.py tests/runtime/test_exit_head.py 2>&1 \
      | grep -E "^E |passed|failed" | head -10
    ;;
  exit2)
    join_reference
    two_drafts exit-head exit 1e-3 8 15
    cp "$(ls "$W"/exit8.work/target-answers-*.jsonl | head -1)" "$W/answers.jsonl"
    for layer in 8 15; do
      grep -v -i "warn\|it/s\]" "$OUT/exit$layer.log" | tail -2
      [ -d "$W/exit$layer" ] || continue
      tar -C "$W" -cf "$OUT/exit$layer.tar" "exit$layer"
      OUT="$OUT/exit$layer" timeout 140 python3 bench/static_speculative.py --target "$W/reference" \
        --draft "$W/exit$layer" --device cuda --k 1 2 3 --small gemv-rows --draft-vocab 0 8192 \
        --vocab-from "$W/answers.jsonl" --new-tokens 128 2>&1 | grep -v -i "warn\|Loading weights" | tail -14
    done
    ;;
  exit3a)
    cp .gpu/a/gguf.* "$W"/
    ;;
  exit3)
    join_reference
    two_drafts early-exit early 5e-4 4 6
    for layers in 4 6; do
      grep -v -i "warn\|it/s\]" "$OUT/early$layers.log" | tail -2
      [ -d "$W/early$layers" ] || continue
      OUT="$OUT/early$layers" timeout 140 python3 bench/static_speculative.py --target "$W/reference" \
        --draft "$W/early$layers" --device cuda --k 1 2 3 --small gemv-rows --new-tokens 128 2>&1 \
        | grep -v -i "warn\|Loading weights" | tail -8
    done
    ;;
  spec13)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_eagle.py \
      tests/runtime/test_eagle_rows.py tests/runtime/test_scheduler.py tests/runtime/test_paged_attention.py \
      tests/runtime/test_engine.py tests/runtime/test_static_speculative.py 2>&1 | grep -E "^E |passed|failed" | head -10
    ;;
  spec12a)
    cp .gpu/a/gguf.* "$W"/
    tar -C "$W" -xf .gpu/a/eagle-long.tar
    ;;
  spec12)
    join_reference
    served_real 2 "1 plain" "1 eagle" "8 plain" "8 eagle" "64 plain" "64 eagle"
    ;;
  spec8)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_eagle.py \
      tests/runtime/test_eagle_rows.py tests/runtime/test_scheduler.py -k "eagle or rows or token_rows or cuda or draft or greedy" 2>&1 | grep -E "^E |passed|failed" | head -10 || true
    timeout 300 python3 bench/speculative_serving.py --clients 1 8 64 --requests-per-client 2 --new-tokens 96 \
      --per-sequence --profile 1 8 2>&1 | grep -v -i "warn\|forward_call"
    cp artifacts/bench/speculative_serving.json "$OUT"/
    ;;
  spec9a)
    cp .gpu/a/gguf.* "$W"/
    tar -C "$W" -xf .gpu/a/eagle-long.tar
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_eagle.py \
      tests/runtime/test_eagle_rows.py tests/runtime/test_scheduler.py tests/runtime/test_paged_attention.py \
      -k "eagle or rows or cuda or draft or greedy" 2>&1 | grep -E "^E |passed|failed" | head -10 || true
    timeout 200 python3 bench/speculative_serving.py --clients 1 8 64 --requests-per-client 2 --new-tokens 96 \
      --per-sequence 2>&1 | grep -v -i "warn\|forward_call"
    cp artifacts/bench/speculative_serving.json "$OUT"/
    ;;
  3)
    shift
    python3 -m compress.distill --config configs/distill/smollm2-half.yaml --teacher "$W/reference" \
      --out "$W/distilled" --overwrite --accelerator gpu "$@" 2>&1 | grep -v "it/s\]" | tail -40
    cp "$W/distilled/shrinkwrap.json" "$OUT/distilled.json"
    cp "$W"/distilled.work/logs/version_0/metrics.csv "$OUT/distill_metrics.csv"
    ;;
esac
