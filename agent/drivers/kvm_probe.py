"""The probe guest that tells whether KVM really runs guests here.

/dev/kvm can exist where KVM guests crawl: a nested hypervisor that emulates
what real hardware runs (Debian's kernels then never finish decompressing).
The image is kvm_probe.S assembled; QEMU runs it with `-kernel`; under
working KVM it exits (status 3, through isa-debug-exit) within
milliseconds, under TCG within about a second; the agent picks KVM only if it
exits so within TIMEOUT.
"""

from __future__ import annotations

# Seconds the probe may take under KVM: TCG itself needs about one.
TIMEOUT = 3.0
# isa-debug-exit's status for the value the probe writes (1): (1 << 1) | 1.
EXIT_STATUS = 3
IMAGE = bytes.fromhex(
    "02b0ad1b00000100fe4f51e40000100000001000060110000641100020001000fabf0020100089fe31c0b9000c0000f3"
    "ab89f78d860310000089078d8603200000898700100000b8830000008dbe00200000b9000200008907050000200083c7"
    "08e2f40f22de0f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d010000800f22c00f011500011000ea"
    "96001000080066b810008ed88ed048c7c60000000148c7c70000000348c7c100000002fcf3a44831c048c7c1a0860100"
    "4801c8e2fb48bb50b5062a010000004839d8750e66baf803b04bee66ba0105b001eef4ebfd8d76000000000000000000"
    "00000000009a200000000000009200001700e8001000"
)
