"""Generated gRPC stubs of the ``stadapter.v1`` API (grpcio + protobuf only, no torch).

``from stadapter_api.v1 import inference_pb2, inference_pb2_grpc``.
Regenerate with ``python -m stadapter_api.generate`` after editing the .proto.
"""
