"""The task registry: which version of which task is served, its folders on disk, and the marks replicas share per task name."""
