-- Rows in = samples + rejects + duplicates, per ingest run (from the ledger).
SELECT dataset, run_id, counts.rows_in AS rows_in, counts.samples AS samples, counts.rejects AS rejects,
       counts.duplicates AS duplicates,
       counts.rows_in = counts.samples + counts.rejects + counts.duplicates AS balanced,
       timings_s.total AS seconds
FROM runs
WHERE stage = 'ingest'
ORDER BY finished_at
