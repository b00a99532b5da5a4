-- The logical `labels` table of a firstkd 2.0 store, in DuckDB >= 1.3 (lists are 1-based).
-- Replace STORE with the store directory. Scales: probabilities in 1/1024 (q = 0 decodes as
-- 0.001/1024), target log-prob -q/256, entropy q/64 (the manifest's "quantization").
CREATE VIEW labels AS
SELECT l.sample_id,
       l.position,
       s.input_ids[l.position + 2] AS target_id,
       l.in_loss,
       l.topk_ids,
       list_transform(l.topk_probs_q, lambda q: CAST(ln(greatest(q, 0.001) / 1024.0) AS FLOAT)) AS topk_logprobs,
       CAST(CASE WHEN l.target_logprob_q IS NULL
                 THEN ln(greatest(l.topk_probs_q[list_position(l.topk_ids, s.input_ids[l.position + 2])], 0.001) / 1024.0)
                 ELSE l.target_logprob_q / -256.0 END AS FLOAT) AS target_logprob,
       CAST(l.entropy_q / 64.0 AS FLOAT) AS entropy
FROM read_parquet('STORE/labels/*.parquet') l
JOIN read_parquet('STORE/samples/*.parquet') s USING (sample_id);
