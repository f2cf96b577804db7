"""`kvtier bench tiers|scheduler|engine|replay|vllm`: each figure a ratio against a limit measured in the
same run; `common` holds what they share (timing, medians, JSON output)."""
