"""Default endpoints, written once: every config dataclass and command-line flag takes them from here."""

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"  # the broker's client endpoint (bind: broker; connect: clients, gateway)
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"   # the broker's worker endpoint (bind: broker; connect: workers)
DEFAULT_GATEWAY_HTTP = "127.0.0.1:8000"    # the gateway's HTTP/REST listen address (KServe v2's usual port)
DEFAULT_GATEWAY_GRPC = "127.0.0.1:8001"    # the gateway's gRPC listen address
DEFAULT_GATEWAY_TIMEOUT_S = 30.0           # the gateway's deadline of a request that names none (--timeout-s)
