"""A real domsnapd and real test guests, shared by the integration tests
(tests/integration/) and the benchmarks (bench/): `harness` starts and
drives the agent and makes guest configs and disks, `guestprobe` reads what
the test guest prints."""
