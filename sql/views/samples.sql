-- Instruction samples, one row per distinct conversation (hive column: dataset).
SELECT * FROM read_parquet(getvariable('thresher_root') || '/samples/instruction/*/*.parquet', hive_partitioning = true, union_by_name = true)
