-- The most frequent tags per annotator and dataset.
SELECT dataset, annotator, t.tag AS tag, count(*) AS samples, round(avg(t.confidence), 3) AS mean_confidence
FROM tags, unnest(tags) AS u(t)
GROUP BY ALL
ORDER BY samples DESC
LIMIT 100
