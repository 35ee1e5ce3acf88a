# The GPU switches worth timing on a card (PERF.md, v0.11), one place for the scripts that time them
# (device_check.sh, tune.sh). Sourced, not run. Each entry is "name:VAR=value,VAR=value". First the
# candidates (the approximate SiLU of the bf16/fp16 GroupNorms, stop 40, untimed; TMA copies at
# input stride 2, GroupNorm backward sums two channels a thread, 16-bit copies by parity-class
# launches and by split reductions, stop 39, untimed; attention in rows of
# queries, stop 38, untimed; the few-output and the few-input convolutions on tensor cores, stop 37,
# untimed; split launches' reductions computing the one-pass GroupNorms after them, stop 36,
# untimed; 16-bit output gradients for every GroupNorm backward pass that can, not only those over
# 16-bit inputs; four streams, for the parity classes side by side; tf32 attention products, a
# default at v0.5 and slower at batch 1 at v0.6; the fused attention, slower at v0.5 and v0.6), then
# each v0.11 default turned off (parity classes side by side; attention products whose warps split
# K; concatenation sums eight pixels ahead), each v0.10 default turned off (residual gradients added
# by the GroupNorm backward passes; 16-bit output gradients for the passes over 16-bit inputs), each
# v0.9 default turned off (concatenation sides written by their producers; 16-bit copies by staged
# epilogues), each v0.8 default turned off (two-way splits unsplit to stage; staged epilogues, which
# also keeps those splits, with the tall tiles off too; fused shortcuts; concatenation gradients
# written by their GroupNorms; 16-bit concatenations in recording forwards), each v0.7 default
# turned off (16-bit concatenations for the GroupNorms, GroupNorm sums from their producers, 16-bit
# copies by their writers), each v0.6 default turned off (with TMA on, no_lean only reaches the
# wgmma launches TMA does not take), then the tall tiles, the stream count either way and each older
# default turned off (does it still pay on this card and workload?); device_check.sh's deadline cuts
# from the end.
CANDIDATES=(
    approx_silu:INVDIFF_APPROX_SILU=1
    tma_strided:INVDIFF_TMA_STRIDED=1
    gn_bwd_sums_pairs:INVDIFF_GN_BWD_SUMS_PAIRS=1
    class_half_copies:INVDIFF_CLASS_HALF_COPIES=1
    reduce_half_copies:INVDIFF_REDUCE_HALF_COPIES=1
    attn_rows:INVDIFF_ATTN_ROWS=1
    attn_rows_wave:INVDIFF_ATTN_ROWS=wave
    narrow_mma:INVDIFF_NARROW_MMA=1
    few_in_mma:INVDIFF_FEW_IN_MMA=1
    gn_from_reduction:INVDIFF_GN_FROM_REDUCTION=1
    gn_half_dy_all:INVDIFF_GN_HALF_DY=1
    streams4:INVDIFF_STREAMS=4
    attn_tf32:INVDIFF_ATTN_TF32=1
    attn_flash:INVDIFF_ATTN_FLASH=1
    no_class_concurrency:INVDIFF_CLASS_CONCURRENCY=0
    no_gemm_warp_k:INVDIFF_GEMM_WARP_K=0
    no_concat_sums_ahead:INVDIFF_CONCAT_SUMS_AHEAD=0
    no_gn_add_residual:INVDIFF_GN_ADD_RESIDUAL=0
    no_gn_half_dy:INVDIFF_GN_HALF_DY=0
    no_concat_from_producers:INVDIFF_CONCAT_FROM_PRODUCERS=0
    no_epi_half_copies:INVDIFF_EPI_HALF_COPIES=0
    no_staged_unsplit:INVDIFF_STAGED_UNSPLIT=0
    no_epi_staged:INVDIFF_EPI_STAGED=0
    no_epi_staged_no_tall:INVDIFF_EPI_STAGED=0,INVDIFF_WGMMA_TALL=0
    no_shortcut_fused:INVDIFF_SHORTCUT_FUSED=0
    no_concat_grad_split:INVDIFF_CONCAT_GRAD_SPLIT=0
    no_gn_half_input_recording:INVDIFF_GN_HALF_INPUT_RECORDING=0
    no_gn_half_input:INVDIFF_GN_HALF_INPUT=0
    no_gn_producer_sums:INVDIFF_GN_PRODUCER_SUMS=0
    no_half_copy_fused:INVDIFF_HALF_COPY_FUSED=0
    no_tma:INVDIFF_WGMMA_TMA=0
    no_lean:INVDIFF_WGMMA_LEAN=0
    no_gn_ilp:INVDIFF_GN_ILP=0
    no_half_copy_small:INVDIFF_HALF_COPY_SMALL=0
    no_epi_prefetch:INVDIFF_EPI_PREFETCH=0
    no_tall:INVDIFF_WGMMA_TALL=0
    streams1:INVDIFF_STREAMS=1
    streams3:INVDIFF_STREAMS=3
    no_gn_one_pass:INVDIFF_GN_ONE_PASS=0
    no_half_concat:INVDIFF_HALF_CONCAT=0
    no_half_copy:INVDIFF_HALF_COPY=0
    no_alias_grads:INVDIFF_ALIAS_GRADS=0
    no_row_epilogue:INVDIFF_ROW_EPILOGUE=0
    no_small_tiles:INVDIFF_GEMM_SMALL_TILES=0
    no_fold:INVDIFF_UPSAMPLE_FOLD=0
    fold_all:INVDIFF_UPSAMPLE_FOLD=1
)
