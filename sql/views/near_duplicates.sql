-- Near-duplicate groups from embeddings (one row per sample; keep = false for the near-copies).
SELECT regexp_extract(filename, 'annotations/near_dup_([^/]+)/', 1) AS model, * EXCLUDE (filename)
FROM read_parquet(getvariable('thresher_root') || '/annotations/near_dup_*/*/*.parquet', hive_partitioning = true, union_by_name = true, filename = true)
