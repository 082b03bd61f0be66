-- Image formats and sizes per dataset.
SELECT dataset, image_format, count(*) AS images, min(width) AS min_w, max(width) AS max_w,
       min(height) AS min_h, max(height) AS max_h, sum(octet_length(image)) AS bytes
FROM image_samples
GROUP BY ALL
ORDER BY dataset, images DESC
