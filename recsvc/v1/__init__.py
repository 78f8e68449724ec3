"""Generated gRPC/protobuf stubs for package recsvc.v1 (built from proto/, never edited)."""
