"""The engine: what a request holds (admission), bytes to top-k (pipeline), dynamic batching,
the model thread and its device slots, the answer cache."""
