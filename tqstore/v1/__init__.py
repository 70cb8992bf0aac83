"""Generated gRPC/protobuf code for proto/tqstore/v1/tqstore.proto (regenerate: tools/gen_proto.sh)."""
