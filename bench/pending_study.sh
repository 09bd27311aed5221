#!/usr/bin/env bash
# What is left of the query-aware study (issue 10), in the order it is wanted: ours (the JAX venv) and kvpress's (the
# bench venv), one at a time. Every command resumes from its own cells / rows, so this script can be stopped at any
# point and started again; a finished step costs a few seconds of checking.
#
#     nohup bash bench/pending_study.sh > study.log 2>&1 &      # then, any time:
#     .venv/bin/python bench/query_aware_study.py --report-only
#
# To stop it, stop its current step too (killing the script alone leaves that step running on, beside the next start):
#     pkill -f pending_study.sh; pkill -f query_aware_study.py; pkill -f kvpress_study.py
# Pause / resume: pkill -STOP (-CONT) -f query_aware_study.py (or kvpress_study.py). Edit this file only by replacing
# it (write a copy, then mv it over): bash reads a running script as it goes.
#
# One at a time, not side by side: on this 2-core machine a cell of 10 needle prompts of ours (joint_G1(snapkv)) took
# 44-45 s alone and 134 s in an earlier run beside kvpress's (each process's threads stall the other's), so two
# lanes at once finish later than one after the other.
set -u
cd "$(dirname "$0")/.."
STUDY=bench/results/study
PROMPTS=$STUDY/prompts
FOUR=snapkv,expected_attention,streaming,tova

ours() {  # ours_STEP
    local run=(.venv/bin/python bench/query_aware_study.py --skip-kvpress --prompts 100)
    case $1 in
        # the pre-registered test of claim (c) with KVzip's ranking kept (bench/results/study/kvzip_shares_plan.md)
        1) "${run[@]}" --lengths 1024 --tasks multi_key,multi_value,two_needles \
               --variants "kvzip,joint(kvzip)@shares_global" ;;
        # the paper's setting (question only) at 2k, beside kvpress's 2k rows: the token methods and joint(snapkv)
        # over one prefill per batch (the rows of "tokens" and "joint(snapkv)")
        2) "${run[@]}" --lengths 2048 --tasks needle,multi_key --variants tokens_and_joint ;;
        # kvpress's question-aware protocol on our side (the question prefilled over the full context and kept
        # uncompressed), beside kvpress's 2k rows: is the comparison fair, and do the claims change under it?
        2q) "${run[@]}" --lengths 2048 --tasks multi_key,needle --variants "tokens_and_joint+qfull" ;;
        # the two multi-item tasks at 2k, both settings
        3) "${run[@]}" --lengths 2048 --tasks multi_value,two_needles \
               --variants "tokens_and_joint,tokens_and_joint+look24" ;;
        # is the 2k gain of joint(snapkv) over SnapKV again the value-aware ranking? The same allocation with G = 1
        # (whole tokens), as checked at 1k
        4) "${run[@]}" --lengths 2048 --tasks needle,multi_key --variants "joint_G1(snapkv)" ;;
        # claim (b) at 2k against the press that beat the combination at 1k: KVzip alone and the joint allocation
        # priced by its scores (joint(kvzip)@global), over one prefill and one repetition pass per batch
        5) "${run[@]}" --lengths 2048 --tasks needle,multi_key --variants "pairz(kvzip)" ;;
        # kvpress's question protocol on the two multi-item tasks at 2k, beside their kvpress rows
        6) "${run[@]}" --lengths 2048 --tasks multi_value,two_needles --variants "tokens_and_joint+qfull" ;;
    esac
}

kvpress() {  # kvpress TASK_LENGTH... (PRESSES, default the four scoring presses)
    local task
    for task in "$@"; do
        .venv-bench/bin/python bench/kvpress_study.py "$PROMPTS/$task.jsonl" "$STUDY/kvpress.jsonl" \
            --presses "${PRESSES:-$FOUR}" --threads 2
    done
}

checks() {  # the README's shared-prefill checks, their output stored (measured before batched decoding and under
    # eager attention, so reproduced with --decode-one-at-a-time --eager)
    mkdir -p "$STUDY/checks"
    local check=(.venv-bench/bin/python bench/kvpress_study.py "$PROMPTS/needle_1024.jsonl" "$STUDY/kvpress.jsonl"
                 --threads 2 --decode-one-at-a-time --eager)
    [ -s "$STUDY/checks/shared_prefill_scoring_presses.txt" ] ||
        "${check[@]}" --presses "$FOUR" --check-shared 2 > "$STUDY/checks/shared_prefill_scoring_presses.txt"
    [ -s "$STUDY/checks/shared_prefill_kvzip.txt" ] ||
        "${check[@]}" --presses kvzip --check-shared 3 > "$STUDY/checks/shared_prefill_kvzip.txt"
    [ -s "$STUDY/checks/shared_prefill_adakv.txt" ] ||
        "${check[@]}" --presses adakv_snapkv --check-shared 3 > "$STUDY/checks/shared_prefill_adakv.txt"
}

ours 1
kvpress multi_value_1024 two_needles_1024
ours 2
kvpress needle_2048 multi_key_2048
ours 2q
ours 3
kvpress multi_value_2048 two_needles_2048
checks
ours 4
ours 5
PRESSES=kvzip kvpress needle_2048 multi_key_2048
ours 6
