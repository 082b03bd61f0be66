-- Why inputs were rejected, per dataset and kind.
SELECT dataset, kind, reason, count(*) AS rejects, any_value(detail) AS example_detail
FROM rejects
GROUP BY ALL
ORDER BY rejects DESC
