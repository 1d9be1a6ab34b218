"""Decoding off the event loop: a pool of sandboxed decoder processes (PyAV and numpy, no torch)
and the shared memory their frames come back in."""
