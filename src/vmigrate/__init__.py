"""vmigrate: a migration control plane for QEMU/KVM virtual machines."""

__version__ = "0.1.0"
