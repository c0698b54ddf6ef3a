"""Generated protobuf modules (see edgecloud.protocol.codegen)."""
