"""The job API: Job, Batch, their spec and results, and exports on their own."""
