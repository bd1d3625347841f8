"""domsnap: VM domain snapshots (RAM and every disk at one instant).

The package is assembled from the repository's folders (pyproject.toml):
this one and the generated API under v1/, `agent/` as `domsnap.agent` and
`client/` as `domsnap.client`.
"""

__version__ = "0.1.0"
