-- The run ledger: one row per stage run with its parameters, counts and timings.
SELECT * FROM read_json(getvariable('thresher_root') || '/runs/*.json', union_by_name = true, maximum_object_size = 67108864)
