-- Samples per detected format, over all datasets.
SELECT source_format, count(*) AS samples, count(DISTINCT dataset) AS datasets
FROM samples
GROUP BY ALL
ORDER BY samples DESC
