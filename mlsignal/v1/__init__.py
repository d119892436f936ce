"""Generated gRPC/protobuf code for the mlsignal API (do not edit; run `make protos`)."""
