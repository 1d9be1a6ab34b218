"""Names both ends of the wire must agree on, in one place (no torch, no grpc).

The server, the clients and the exporter import these instead of spelling the
strings themselves, so a renamed field or file cannot drift between them.
"""

from __future__ import annotations

# ``SamplingOverrides`` fields, each also a ``stadapter.config.SamplingConfig`` field of the same name.
SAMPLING_OVERRIDE_FIELDS = ("num_frames", "mode", "stride", "temporal_views", "spatial_views", "autorotate", "seek")

# The environment variable holding the admin bearer token (server and CLI).
ADMIN_TOKEN_ENV = "STADAPTER_ADMIN_TOKEN"

# A task bundle's two files (see stadapter.bundle).
TASK_FILE = "task.json"
ADAPTER_FILE = "adapter.safetensors"
BUNDLE_FILES = (TASK_FILE, ADAPTER_FILE)

# The Open Inference Protocol (KServe v2) model of every task: its input and outputs.
OIP_CLIP_INPUT = "CLIP"  # BYTES [N]: one encoded video file per element
OIP_LABELS_OUTPUT = "LABELS"  # BYTES [N, k]: top-k labels, best first
OIP_SCORES_OUTPUT = "SCORES"  # FP32 [N, k]: their probabilities
