-- The logical `labels` table of a firstkd 2.0 store, in Spark SQL (arrays are 0-based with
-- [], element_at is 1-based). Register the two folders first, for example
--   spark.read.parquet("STORE/labels").createOrReplaceTempView("stored_labels")
--   spark.read.parquet("STORE/samples").createOrReplaceTempView("samples")
-- Scales: probabilities in 1/1024 (q = 0 decodes as 0.001/1024), target log-prob -q/256,
-- entropy q/64 (the manifest's "quantization").
CREATE OR REPLACE TEMPORARY VIEW labels AS
SELECT l.sample_id,
       l.position,
       s.input_ids[l.position + 1] AS target_id,
       l.in_loss,
       l.topk_ids,
       transform(l.topk_probs_q, q -> CAST(ln(greatest(q, 0.001) / 1024.0) AS FLOAT)) AS topk_logprobs,
       CAST(CASE WHEN l.target_logprob_q IS NULL
                 THEN ln(greatest(element_at(l.topk_probs_q, CAST(array_position(l.topk_ids, s.input_ids[l.position + 1]) AS INT)), 0.001) / 1024.0)
                 ELSE l.target_logprob_q / -256.0 END AS FLOAT) AS target_logprob,
       CAST(l.entropy_q / 64.0 AS FLOAT) AS entropy
FROM stored_labels l
JOIN samples s ON l.sample_id = s.sample_id
