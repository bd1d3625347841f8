"""The domsnap client: the CLI and the connection to an agent."""

import os

# The CLI says what went wrong in one line on stderr; gRPC's C core would
# log a failed TLS handshake there too, by itself. It reads this when it
# loads, so it is set before anything here imports grpc; an explicit
# GRPC_VERBOSITY (e.g. debug) wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
