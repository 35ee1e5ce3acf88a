# The GPU candidate switches (PERF.md, "v0.5 candidates"), one place for the scripts that time
# them (device_check.sh, tune.sh). Sourced, not run. Each entry is "name:VAR=value,VAR=value";
# the forms that only make sense together (a tile with the row epilogue) are entries of their own.
CANDIDATES=(
    gn_one_pass:INVDIFF_GN_ONE_PASS=1
    half_concat:INVDIFF_HALF_CONCAT=1
    half_copy:INVDIFF_HALF_COPY=1
    alias_grads:INVDIFF_ALIAS_GRADS=1
    row_epilogue:INVDIFF_ROW_EPILOGUE=1
    attn_tf32:INVDIFF_ATTN_TF32=1
    attn_flash:INVDIFF_ATTN_FLASH=1
    tall:INVDIFF_WGMMA_TALL=1
    rows_tall:INVDIFF_ROW_EPILOGUE=1,INVDIFF_WGMMA_TALL=1
    small_tiles:INVDIFF_GEMM_SMALL_TILES=1
    upsample_fold:INVDIFF_UPSAMPLE_FOLD=1
    streams2:INVDIFF_STREAMS=2
)
