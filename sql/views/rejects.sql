-- Every input that could not be used, with its source, offset and reason.
SELECT * FROM read_parquet(getvariable('thresher_root') || '/rejects/*/*.parquet', hive_partitioning = true, union_by_name = true)
