"""The protocols: stadapter.v1 gRPC, the Open Inference Protocol over gRPC and REST, the plain HTTP upload, and the tokens they check."""
