-- Exact duplicates dropped at ingest, each with the copy that was kept.
SELECT * FROM read_parquet(getvariable('thresher_root') || '/duplicates/*/*.parquet', hive_partitioning = true, union_by_name = true)
