# End-to-end check of `moeserve plan memory` on the published configs: the report on stdout and
# the exit codes a script relies on (0 fits, 1 does not fit with the reason on stderr, 2 bad
# arguments). Run by ctest as:
#   cmake -DMOESERVE_BINARY=... -DCONFIGS=tests/fixtures/configs -P plan_memory_end_to_end.cmake

function(run_plan expected_exit)
  execute_process(COMMAND "${MOESERVE_BINARY}" plan memory ${ARGN}
                  RESULT_VARIABLE exit_code OUTPUT_VARIABLE output ERROR_VARIABLE errors)
  if(NOT exit_code EQUAL expected_exit)
    message(FATAL_ERROR "plan memory ${ARGN} exited ${exit_code}, expected ${expected_exit}:\n"
                        "${output}\n${errors}")
  endif()
  set(output "${output}" PARENT_SCOPE)
  set(errors "${errors}" PARENT_SCOPE)
endfunction()

function(expect text pattern)
  if(NOT text MATCHES "${pattern}")
    message(FATAL_ERROR "'${pattern}' not found in:\n${text}")
  endif()
endfunction()

# DeepSeek-V3 in its FP8 format on 8 H200s: fits.
run_plan(0 --model ${CONFIGS}/deepseek-v3.json --ep 8 --gpu-memory-gib 139)
expect("${output}" "671\\.03 B parameters, 37\\.55 B active per token")
expect("${output}" "weights  fp8, ")
expect("${output}" "routed experts \\(32 x 58 layers\\) +76\\.14 GiB")
expect("${output}" "dense weights \\(on every GPU\\) +31\\.88 GiB +as served \\(17\\.77 GiB as stored\\)")
expect("${output}" "tokens that fit +412,131 +per GPU")
expect("${output}" "\nfits +412,131 tokens per GPU >= 163,840 required\n")

# On 16 H100s its weights fit (dense weights in bf16 as served), but one full-context request does
# not.
run_plan(1 --model ${CONFIGS}/deepseek-v3.json --ep 16 --gpu-memory-gib 78)
expect("${errors}" "the KV cache does not fit: the 4\\.04 GiB left per GPU hold 61,793 tokens")
expect("${output}" "fewest GPUs that fit with these settings: EP32")

# With the dense projections in FP8 as well (--gpu-dense-weights as-stored), one full-context
# request fits 16 H100s.
run_plan(0 --model ${CONFIGS}/deepseek-v3.json --ep 16 --gpu-memory-gib 78
         --gpu-dense-weights as-stored)
expect("${output}" "dense weights \\(on every GPU\\) +18\\.96 GiB +as served \\(17\\.77 GiB as stored\\)")
expect("${output}" "tokens that fit +259,285 +per GPU")
run_plan(2 --model ${CONFIGS}/deepseek-v3.json --ep 16 --gpu-memory-gib 78 --gpu-dense-weights fp8)

# The same in bf16: the weights do not fit; exit 1 and the reason on stderr.
run_plan(1 --model ${CONFIGS}/deepseek-v3.json --ep 8 --gpu-memory-gib 139 --dtype bf16)
expect("${output}" "DOES NOT FIT: the weights do not fit")
expect("${output}" "fewest GPUs that fit with these settings: EP16")
expect("${errors}" "moeserve plan memory: the weights do not fit: [0-9.]+ GiB per GPU")

# Mixtral 8x22B fits 8 H100s in bf16, but not ten million tokens of KV cache per GPU.
run_plan(0 --model ${CONFIGS}/mixtral-8x22b.json --ep 8 --gpu-memory-gib 78)
run_plan(1 --model ${CONFIGS}/mixtral-8x22b.json --ep 8 --gpu-memory-gib 78
         --max-tokens-per-gpu 10000000)
expect("${errors}" "the KV cache does not fit")

# Bad arguments: exit 2 with a message saying what to change.
run_plan(2 --model ${CONFIGS}/deepseek-v3.json --ep 7 --gpu-memory-gib 139)
expect("${errors}" "do not divide over --ep 7 GPUs")
run_plan(2 --model ${CONFIGS}/no-such.json --ep 8 --gpu-memory-gib 139)
expect("${errors}" "no config.json")
