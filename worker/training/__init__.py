"""Fine-tuning: the pipeline of one fine-tune job, hostile-input-safe data set ingestion and the job's Redis lease."""
