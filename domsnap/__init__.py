"""domsnap: VM domain snapshots (RAM and every disk at one instant).

The agent, the client and the generated API live in the folders `agent/`,
`client/` and `proto/domsnap/v1/`; this package links them under one import
namespace (`domsnap.agent`, `domsnap.client`, `domsnap.v1`).
"""

__version__ = "0.1.0"
