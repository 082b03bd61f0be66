-- Quality / complexity annotations (one row per sample and annotator).
SELECT * FROM read_parquet(getvariable('thresher_root') || '/annotations/*_quality/*/*.parquet', hive_partitioning = true, union_by_name = true)
