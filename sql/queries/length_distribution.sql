-- Conversation length (characters) quantiles and turns per dataset.
SELECT dataset,
       count(*) AS samples,
       round(avg(n_turns), 2) AS mean_turns,
       quantile_cont(n_chars, 0.05)::BIGINT AS p05_chars,
       quantile_cont(n_chars, 0.50)::BIGINT AS p50_chars,
       quantile_cont(n_chars, 0.95)::BIGINT AS p95_chars,
       max(n_chars) AS max_chars
FROM samples
GROUP BY ALL
ORDER BY dataset
