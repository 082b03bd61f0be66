-- Picks per selection with their gain range.
SELECT selection, count(*) AS picks, max(gain) AS first_gain, min(gain) AS last_gain
FROM selections
GROUP BY ALL
ORDER BY selection
