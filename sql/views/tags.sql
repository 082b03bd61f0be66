-- Tag annotations (one row per sample and annotator).
SELECT * FROM read_parquet(getvariable('thresher_root') || '/annotations/*_tags/*/*.parquet', hive_partitioning = true, union_by_name = true, filename = true)
