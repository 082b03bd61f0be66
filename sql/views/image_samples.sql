-- Image-text samples (image bytes in column image; select it only when you need it).
SELECT * FROM read_parquet(getvariable('thresher_root') || '/samples/image_text/*/*.parquet', hive_partitioning = true, union_by_name = true)
