# The GPU switches worth timing on a card (PERF.md, v0.6), one place for the scripts that time
# them (device_check.sh, tune.sh). Sourced, not run. Each entry is "name:VAR=value,VAR=value".
# First the candidates staged after v0.6 (each computes the defaults' bits), alone and together
# (`next`: the set the next defaults would be if both win), then the fused attention (slower
# at v0.5 and v0.6), the stream count either way, and each default turned off (does it still
# pay on this card and workload?); device_check.sh's deadline cuts from the end.
CANDIDATES=(
    half_copy_small:INVDIFF_HALF_COPY_SMALL=1
    epi_prefetch:INVDIFF_EPI_PREFETCH=1
    next:INVDIFF_HALF_COPY_SMALL=1,INVDIFF_EPI_PREFETCH=1
    no_attn_tf32:INVDIFF_ATTN_TF32=0
    attn_flash:INVDIFF_ATTN_FLASH=1
    no_tma:INVDIFF_WGMMA_TMA=0
    no_lean:INVDIFF_WGMMA_LEAN=0
    no_gn_ilp:INVDIFF_GN_ILP=0
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
