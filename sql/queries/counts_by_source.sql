-- Samples per dataset, source file and detected format.
SELECT dataset, source_uri, source_format, count(*) AS samples
FROM samples
GROUP BY ALL
ORDER BY dataset, samples DESC
