-- Every selection's picks in order (column selection = the selection's name).
SELECT regexp_extract(filename, 'selections/([^/]+)/', 1) AS selection, * EXCLUDE (filename)
FROM read_parquet(getvariable('thresher_root') || '/selections/*/*.parquet', union_by_name = true, filename = true)
