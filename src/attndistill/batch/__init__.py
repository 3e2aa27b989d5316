"""The batch runner: many jobs from one JSONL file, checked first, resumable, sharded across processes."""
