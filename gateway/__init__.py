"""The KServe v2 (Open Inference Protocol) gateway: HTTP and gRPC in front of a bertpool broker."""
