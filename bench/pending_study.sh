#!/usr/bin/env bash
# What is left of the query-aware study (issue 10), in the order it is wanted, as two lanes run side by side:
# ours (the JAX venv) and kvpress's (the bench venv). Every command resumes from its own cells / rows, so this
# script can be stopped at any point and started again; a finished step costs a few seconds of checking.
#
#     nohup bash bench/pending_study.sh > study.log 2>&1 &      # then, any time:
#     .venv/bin/python bench/query_aware_study.py --report-only
#
# On 2 cores each lane runs at about half speed beside the other; `pkill -STOP -f query_aware_study.py` pauses a
# lane (`-CONT` resumes it).
set -u
cd "$(dirname "$0")/.."
STUDY=bench/results/study
PROMPTS=$STUDY/prompts
FOUR=snapkv,expected_attention,streaming,tova

ours() {
    local run=(.venv/bin/python bench/query_aware_study.py --skip-kvpress --prompts 100)
    # 1. the pre-registered test of claim (c) with KVzip's ranking kept (bench/results/study/kvzip_shares_plan.md)
    "${run[@]}" --lengths 1024 --tasks multi_key,multi_value,two_needles --variants "kvzip,joint(kvzip)@shares_global"
    # 2. the paper's setting (question only) at 2k, beside kvpress's 2k rows
    "${run[@]}" --lengths 2048 --tasks needle,multi_key --variants "tokens,joint(snapkv)"
    # 3. the two multi-item tasks at 2k, both settings
    "${run[@]}" --lengths 2048 --tasks multi_value,two_needles \
        --variants "tokens,joint(snapkv),tokens+look24,joint(snapkv)+look24"
}

kvpress() {
    local run=(.venv-bench/bin/python bench/kvpress_study.py)
    local task
    # 1. kvpress's rows of the 1k tasks that lack them, then 2. the 2k tasks
    for task in multi_value_1024 two_needles_1024 needle_2048 multi_key_2048 multi_value_2048 two_needles_2048; do
        "${run[@]}" "$PROMPTS/$task.jsonl" "$STUDY/kvpress.jsonl" --presses "$FOUR" --threads 2
    done
    # 3. the README's shared-prefill checks, their output stored (measured before batched decoding: reproduced
    #    with --decode-one-at-a-time)
    mkdir -p "$STUDY/checks"
    local check=("${run[@]}" "$PROMPTS/needle_1024.jsonl" "$STUDY/kvpress.jsonl" --threads 2 --decode-one-at-a-time)
    [ -s "$STUDY/checks/shared_prefill_scoring_presses.txt" ] ||
        "${check[@]}" --presses "$FOUR" --check-shared 2 > "$STUDY/checks/shared_prefill_scoring_presses.txt"
    [ -s "$STUDY/checks/shared_prefill_kvzip.txt" ] ||
        "${check[@]}" --presses kvzip --check-shared 3 > "$STUDY/checks/shared_prefill_kvzip.txt"
    [ -s "$STUDY/checks/shared_prefill_adakv.txt" ] ||
        "${check[@]}" --presses adakv_snapkv --check-shared 3 > "$STUDY/checks/shared_prefill_adakv.txt"
}

ours &
kvpress &
wait
