"""The gRPC side: servicer (messages <-> domain calls), server process, interceptors."""
