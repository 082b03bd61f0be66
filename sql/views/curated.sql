-- Curated instruction shards (column curated = the set's name), in rank order per set.
SELECT regexp_extract(filename, 'curated/([^/]+)/', 1) AS curated, * EXCLUDE (filename)
FROM read_parquet(getvariable('thresher_root') || '/curated/*/*.parquet', union_by_name = true, filename = true)
